"""The egress guard: a ClientApp mod every reply passes through on its way out.

Only declared records and whitelisted finite numbers may leave (``privacy.egress``), and
no value equal to one of the site's identifying header values (by keyed fingerprint). A
blocked reply is replaced by an error reply; the block is logged and written to the site's
audit log, naming the keys, never the values. An exception anywhere below the guard is
logged here, at the site, with its detail, and answered with a numeric code and that code's
fixed text only (``privacy.egress.SITE_ERRORS``): no exception text leaves the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.audit_trail import SiteAudit
from client.config import SiteConfig, SiteConfigError
from client.dicom import SiteDataError
from client.dicom.ingest import identifying_fingerprints
from privacy.audit.events import E
from privacy.egress import SITE_ERRORS, check_reply
from privacy.files import LockTimeout
from privacy.ledger import LedgerChangedError, LedgerCorruptError
from privacy.protocol import RoundRequestError

EGRESS_BLOCKED = 451  # error code of a reply the guard stopped
# fixed text: the problems name the reply's keys, which a malicious server may have chosen to
# be identifying (``undeclared metric 'DOE_JOHN'``); they stay in the site's log
BLOCKED_REASON = "egress guard blocked the reply (the site's log says why)"
log = logging.getLogger("medfed.site")

Resolver = Callable[[Context], SiteConfig]
_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (SiteConfigError, 460), ((LedgerCorruptError, LedgerChangedError, LockTimeout), 461),
    (RoundRequestError, 462), (SiteDataError, 463),
)


def error_code(exc: BaseException) -> int:
    """The numeric code an exception at the site is answered with."""
    return next((code for kinds, code in _CODES if isinstance(exc, kinds)), 469)


def egress_guard(resolve: Resolver) -> Mod:
    """The mod; ``resolve`` finds the site's configuration from the node context."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            reply = call_next(msg, context)
        except Exception as exc:  # the outermost layer: detail stays here, a code leaves
            code = error_code(exc)
            log.error("site request %s failed (code %d): %s", msg.metadata.message_type, code, exc,
                      exc_info=code == 469)
            return Message(Error(code=code, reason=SITE_ERRORS[code]), reply_to=msg)
        if reply.has_error():
            return reply
        site = resolve(context)
        prints, key = identifying_fingerprints(site.cache_dir)
        problems = check_reply(reply.content, prints, key)
        if not problems:
            return reply
        log.warning("site %s: egress guard blocked a reply: %s", site.name, "; ".join(problems))
        SiteAudit(site).log.append(E.EGRESS_BLOCKED, {"message_type": msg.metadata.message_type.replace(".", "-"),
                                                      "problems": len(problems)})
        return Message(Error(code=EGRESS_BLOCKED, reason=BLOCKED_REASON), reply_to=msg)

    return mod
