"""Privacy attacks a site runs against what it shares: membership inference, gradient inversion
and a one-run canary audit of its DP guarantee. Only numbers leave the site (``privacy.attacks.result``)."""
