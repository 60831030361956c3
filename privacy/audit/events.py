"""Names of the audit events, written by server and sites and read by verify and the report."""

from __future__ import annotations

SERVER_ACTOR = "server"


class E:
    """Event names (the ``event`` field)."""

    # server
    RUN_START = "run-start"  # run_id, config_sha256, code_sha256, versions, sites, secure_aggregation
    SITE_ENROLLED = "site-enrolled"
    ROUND_START = "round-start"  # run_id, round, global_sha256, nodes
    SITE_REPLY = "site-reply"  # run_id, round, site, status (trained|refused|error|timeout), site_head, epsilon
    SECAGG = "secure-aggregation"  # run_id, round, sites, dropped, aborted, k, threshold
    AGGREGATE = "aggregate-applied"  # run_id, round, sites, new_sha256
    AGGREGATE_REJECTED = "aggregate-rejected"  # run_id, round, norm, bound: a secure aggregate above the bound
    CHECKPOINT = "checkpoint-written"  # run_id, round, file, sha256
    ROUND_END = "round-end"  # run_id, round, metrics_sha256: digest of the round's row of metrics.json
    RUN_END = "run-end"  # run_id, rounds, final_sha256, ended_early (the round every site refused, or null)
    RUN_STOPPED = "run-stopped"  # run_id, reason, round (last applied), final_sha256, abandoned (round or null)
    RUN_RESUMED = "run-resumed"  # run_id, next_round, global_sha256, abandoned (the round cut short, or null)
    # site
    RUN_JOINED = "run-joined"  # run_id, config_sha256
    CONFIG = "config-changed"  # config_sha256
    ROUND_TRAINED = "round-trained"  # run_id, round, global_sha256, noise_multiplier, sample_rate, steps, ...
    EVALUATED = "round-evaluated"  # run_id, round, global_sha256, metrics (dp|exact), dp, noise_multiplier, ...
    REFUSED = "refused"  # run_id, round, global_sha256, reason
    UPDATE_BOUNDED = "update-bounded"  # run_id, round, bound, scaled: the site held its update to its norm bound
    EGRESS_BLOCKED = "egress-blocked"
    CODE_REFUSED = "code-refused"  # code_sha256 (the bundle's digest), fab_sha256, run_id (Flower's run id)
    CODE_FOREIGN = "code-ran"  # code_sha256, run_id: an approved bundle other than the installed medfed ran
    CODE_APPROVED = "code-approved"  # code_sha256
    CODE_REVOKED = "code-revoked"  # code_sha256
    ROSTER_PINNED = "roster-pinned"  # roster_sha256
    ROSTER_EXPECTED = "roster-expected"  # roster_sha256 (obtained out of band)
    SECAGG_ADVERTISED = "secagg-advertised"  # run_id, round: keys advertised (a round is never restarted)
    SECAGG_REVEALED = "secagg-revealed"  # run_id, round: graph nonce revealed (sparse graphs)
    SECAGG_MASKED = "secagg-masked"  # run_id, round: masked input sent after a reveal (sparse graphs)
    SECAGG_REFUSED = "secagg-refused"  # run_id, round, reason (secagg-<check>), stage
    SECAGG_CLIPPED = "secagg-clipped"  # run_id, round, count, max_abs: update values the round's range clipped
    ROSTER_ACCEPTED = "roster-accepted"  # roster_sha256
    # every site entry of a round (trained, refused, evaluated) also records server_head: the server's chain head
    # the request carried, the site's counter-signature of the server's log up to there
