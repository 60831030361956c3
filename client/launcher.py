"""The site's task runner: the only process that runs ClientApps for this site's SuperNode.

The SuperNode runs with ``--isolation process``: it executes nothing itself, and every
message waits in its Runtime API (loopback) until a launcher claims it. ``serve`` imports the
installed medfed once, claims tasks (signed with the SuperExec secret the SuperNode shares,
so no other local process can claim them) and runs each in a child forked from itself
(:func:`run_task`: no per-message interpreter start), which:

1. pulls the task (message, context, run and the app bundle) and checks the bundle's bytes
   against the hash the SuperLink announced;
2. computes the bundle's code digest (``privacy.bundle``) **before any of its code is
   imported**;
3. runs the medfed this site installed when the digest equals the installed one; runs the
   bundle's own ClientApp (installed under ``apps/<digest>``, in a fresh interpreter) only
   when the site approved that digest (``medfed-site approve``); otherwise refuses: a
   ``code-refused`` audit entry, a log line, and an error reply, so the server sees the site
   as failed.

Flower documents the CLIs of this path (``flower-superexec``, ``flwr-clientapp``) but offers no
public API for "verify, then run the installed app" (its ``--trusted-entities`` accepts only
Flower Hub signatures). The task protocol is therefore driven with flwr's own runtime client
functions (``flwr.supercore.runtime``, ``flwr.supernode.runtime.run_clientapp``: public names,
undocumented modules); flwr is pinned exactly in ``pyproject.toml`` for this reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.approvals import approved
from client.audit_trail import SiteAudit
from client.config import SiteConfig, load_site_config
from privacy.audit.events import E
from privacy.bundle import BundleError, bundle_code, code_digest, installed_digest
from privacy.egress import SITE_ERRORS
from privacy.files import private_files

ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the one Runtime API call the SuperExec secret signs
SECRET_FILE = Path("keys") / "superexec.secret"
CODE_REFUSED = 470  # error code of a task whose app bundle the site did not approve
REFUSED_REASON = "code not approved by the site"
log = logging.getLogger("medfed.site")

# Runs an approved bundle's ClientApp in a fresh interpreter (the bundle's packages first on
# sys.path, as Flower itself loads an app), then pushes its reply. Only flwr and stdlib here.
_FOREIGN = """
import importlib, os, pickle, sys
app_dir, ref, address, state = sys.argv[1:5]
from flwr.common.constant import SubStatus
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output
sys.path.insert(0, app_dir)  # only now: the launcher's own imports never resolve into the bundle
with open(state, "rb") as fh:
    token, message, context = pickle.load(fh)
os.unlink(state)
client = RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
    interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
    retry_invoker=make_simple_http_retry_invoker())
beat = HeartbeatSender(make_task_heartbeat_fn_http(client))
beat.start()
module, _, attr = ref.partition(":")
app = getattr(importlib.import_module(module), attr)
status = SubStatus.FAILED
try:
    reply = app(message=message, context=context)
    status = SubStatus.COMPLETED
finally:
    if status == SubStatus.COMPLETED:
        push_message(client, reply, context)
    push_task_output(client, context, status, "" if status == SubStatus.COMPLETED else "approved bundle failed")
    beat.stop()
    client.close()
"""


def task_client(address: str, token: str) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API on loopback (plain HTTP: it never leaves the host)
    that acts for one claimed task."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


def serve(site: SiteConfig, address: str, *, poll: float = 0.5) -> None:
    """Claim ClientApp tasks from the SuperNode at ``address``; run each in a forked child.

    The installed medfed is imported here, before any task (it is the code the site runs), so
    a child starts warm. Nothing here runs a torch operation, so no thread pool is forked.
    """
    import client.app  # noqa: F401  (the installed medfed: every task starts from it)

    installed = installed_digest()
    log.info("site %s: launcher ready, installed medfed %s", site.name, installed)
    secret = (site.workspace / SECRET_FILE).read_bytes()
    base = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})],
        retry_invoker=make_simple_http_retry_invoker())
    try:
        while True:
            res = base.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:  # the child: one task, then exit without the parent's cleanup
                    code = 1
                    try:
                        run_task(site, address, res.token, installed=installed)
                        code = 0
                    finally:
                        os._exit(code)
                os.waitpid(pid, 0)
            time.sleep(poll)
    finally:
        base.close()


def run_task(site: SiteConfig, address: str, token: str, *, installed: str | None = None) -> str:
    """Run one claimed task; returns what happened: ``installed``, ``refused`` or ``failed`` (an
    approved bundle replaces this process and does not return). ``installed``: the installed
    medfed's digest when the caller computed it already."""
    installed = installed or installed_digest()
    client = task_client(address, token)
    beat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    beat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    outcome, status, details = "failed", SubStatus.FAILED, SITE_ERRORS[469]
    try:
        message, context, run, fab = pull_task_input(client)
        digest, fab_sha256, clientapp, files = _identify(fab.content, fab.hash_str, run.fab_hash)
        if digest is not None and digest == installed:
            from client.app import app  # the installed medfed

            reply, outcome, status, details = app(message=message, context=context), "installed", SubStatus.COMPLETED, ""
        elif digest is not None and clientapp is not None and digest in approved(site):
            SiteAudit(site).log.append(E.CODE_FOREIGN, {"code_sha256": digest, "run_id": str(run.run_id)})
            (site.workspace / "apps").mkdir(mode=0o700, exist_ok=True)
            beat.stop()
            _exec_foreign(site, files, digest, clientapp, address, token, message, context)  # does not return
        else:
            _refused(site, digest, fab_sha256, run.run_id, installed)
            reply = Message(Error(code=CODE_REFUSED, reason=REFUSED_REASON), reply_to=message)
            outcome, details = "refused", REFUSED_REASON
    except Exception:  # the reply says only that the site failed; the detail stays in the site's log
        log.exception("site %s: running a task failed", site.name)
        if message is not None:
            reply = Message(Error(code=469, reason=SITE_ERRORS[469]), reply_to=message)
    finally:
        if reply is not None and context is not None:
            push_message(client, reply, context)
        push_task_output(client, context, status, details)
        beat.stop()
        client.close()
    return outcome


def _identify(fab: bytes, claimed: str, announced: str) -> tuple[str | None, str, str | None, dict[str, bytes]]:
    """(code digest, SHA-256 of the bytes, ClientApp reference, verified code files); the digest
    is ``None`` for a malformed bundle or bytes that are not the bundle the SuperLink announced."""
    real = hashlib.sha256(fab).hexdigest()
    if not real == claimed == announced:
        return None, real, None, {}
    try:
        files, clientapp = bundle_code(fab)
    except BundleError:
        return None, real, None, {}
    return code_digest(files, clientapp), real, clientapp, files


def _refused(site: SiteConfig, digest: str | None, fab_sha256: str, flwr_run: int, installed: str) -> None:
    shown = digest or "malformed"
    log.warning("site %s REFUSED app bundle %s (code digest %s) of Flower run %s: it is not the medfed this site "
                "installed (%s) and not approved; if your consortium ships this code, review it and run "
                "`medfed-site approve %s --workspace %s`", site.name, fab_sha256[:16], shown, flwr_run,
                installed[:16], shown, site.workspace)
    SiteAudit(site).log.append(E.CODE_REFUSED, {"code_sha256": digest, "fab_sha256": fab_sha256,
                                                "run_id": str(flwr_run)})


def _exec_foreign(site: SiteConfig, files: dict[str, bytes], digest: str, clientapp: str, address: str, token: str,
                  message: Message, context: Context | None) -> None:
    """Install an approved bundle's verified files (``bundle_code`` checked their names:
    relative, no '..') under ``apps/<digest>/`` and replace this process with a fresh
    interpreter that runs its ClientApp (its packages must not mix with the installed medfed's)."""
    app_dir = site.workspace / "apps" / digest
    if not app_dir.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=site.workspace / "apps"))
        for rel, data in files.items():
            target = (staging / rel).resolve()
            if staging.resolve() not in target.parents:
                raise BundleError("an approved bundle member would land outside its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        os.replace(staging, app_dir)  # a half-written install never carries the digest's name
    fd, state = tempfile.mkstemp(prefix=".task-", dir=site.workspace / "apps")
    with os.fdopen(fd, "wb") as fh:
        pickle.dump((token, message, context), fh)
    os.execv(sys.executable, [sys.executable, "-P", "-c", _FOREIGN, str(app_dir), clientapp, address, state])


def main(argv: list[str] | None = None) -> int:
    """``python -P -m client.launcher serve --workspace WS --runtime-api-address HOST:PORT``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -P -m client.launcher")
    parser.add_argument("mode", choices=("serve",))
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--runtime-api-address", required=True)
    args = parser.parse_args(argv)
    private_files()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(load_site_config(args.workspace), args.runtime_api_address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
