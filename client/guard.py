"""The egress guard: a ClientApp mod every reply passes through on its way out.

Only declared records and whitelisted finite numbers may leave (``privacy.egress``), and
no value equal to one of the site's identifying header values (by keyed fingerprint). A
blocked reply is replaced by an error reply; the block is logged and written to the site's
audit log, naming the keys, never the values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.audit_trail import SiteAudit
from client.config import SiteConfig
from client.dicom.ingest import identifying_fingerprints
from privacy.audit.events import E
from privacy.egress import check_reply

EGRESS_BLOCKED = 451  # error code of a reply the guard stopped
log = logging.getLogger("medfed.site")

Resolver = Callable[[Context], SiteConfig]


def egress_guard(resolve: Resolver) -> Mod:
    """The mod; ``resolve`` finds the site's configuration from the node context."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
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
        return Message(Error(code=EGRESS_BLOCKED, reason="egress guard blocked the reply: " + "; ".join(problems)),
                       reply_to=msg)

    return mod
