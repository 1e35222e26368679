"""`corral serve`: the lifecycle over a unix socket, for every local user.

HTTP (aiohttp) on ``/run/corral/service.sock`` (mode 0666: anyone may connect; the socket's
peer credentials, SO_PEERCRED, say who is calling). Each operation runs in a forked child with
the caller's uid and gid, so a caller acts exactly as they would without the service: they see
and control only their own sandboxes (root: all), and their sandboxes run with their uid. The
service is a child subreaper and reaps the supervisors whose creators exited.

    POST /v1/provision {"request": {...}}     POST /v1/{start,stop,deprovision} {"sandboxId"}
    POST /v1/ps {}                            POST /v1/logs {"sandboxId"}     POST /v1/gc {}
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.lifecycle import gc, manager, session, store
from corral.lifecycle.privsep import drop_to

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def _needs_root(op: str, params: dict[str, Any]) -> bool:
    """isolation_session phases create, use and remove host accounts: they run as root, for the
    caller (whose uid still decides which sandboxes they see)."""
    if op == "provision":
        request = params.get("request")
        return isinstance(request, dict) and request.get("containment") == session.CONTAINMENT
    return op in ("start", "stop", "deprovision", "policy") and session.needs_root(
        params.get("sandboxId")
    )


def _operation(op: str, params: dict[str, Any], acting_uid: int | None) -> Any:
    """Runs in a forked child: as the caller, or as root acting for them (``acting_uid``)."""
    from corral import api as sdk
    from corral.lifecycle import api

    sandbox_id = params.get("sandboxId")
    if op == "provision":
        return manager.provision(sdk.parse(params.get("request") or {}), acting_uid=acting_uid)
    if op == "start":
        _adopt_caller_display(params.get("display"))
    if acting_uid is not None:
        action = {"start": manager.start, "stop": manager.stop, "deprovision": manager.deprovision}
        if op == "policy":
            return manager.set_network_policy(
                str(sandbox_id), params.get("policy"), acting_uid=acting_uid
            )
        return action[op](str(sandbox_id), acting_uid=acting_uid)
    if op in ("start", "stop", "deprovision", "policy"):
        return api.run_locally(op, str(sandbox_id), policy=params.get("policy"))
    if op == "ps":
        return manager.list_sandboxes()
    if op == "logs":
        return manager.logs(str(sandbox_id))
    if op == "gc":
        return gc.collect()
    raise CorralError(f"no service operation {op!r}", code=ErrorCode.UNSUPPORTED_PHASE)


def _adopt_caller_display(display: Any) -> None:
    """The caller's DISPLAY/XAUTHORITY, not the service's, for this (forked) operation: a
    session sandbox's clipboard broker reaches the human's display as the sandbox's owner,
    who can open only what they could open themselves."""
    from corral.lifecycle.api import HUMAN_DISPLAY

    for name in HUMAN_DISPLAY:
        os.environ.pop(name, None)
    if not isinstance(display, dict):
        return
    for name in HUMAN_DISPLAY:
        value = display.get(name)
        if isinstance(value, str) and value and "\0" not in value:
            os.environ[name] = value


async def _run_as_peer(uid: int, gid: int, op: str, params: dict[str, Any]) -> dict[str, Any]:
    if os.getuid() == 0 and uid != 0:
        store.user_dir(uid)  # root creates (and checks) the caller's directory
    r, w = os.pipe2(os.O_CLOEXEC)
    service_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        # An operation dies with the service (what it left half done is for `corral gc`),
        # never finishing unseen after the service and its caller are gone.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != service_pid:
            os._exit(1)
        try:
            acting_uid = None
            if os.getuid() != uid and _needs_root(op, params):
                acting_uid = uid
            elif os.getuid() != uid:
                drop_to(uid, gid)
            os.environ["CORRAL_NO_SERVICE"] = "1"  # the child works locally
            reply: dict[str, Any] = {"result": _operation(op, params, acting_uid)}
        except CorralError as exc:
            reply = exc.to_envelope()
        except BaseException as exc:  # a forked child must never return into the event loop
            reply = {"error": {"code": "backend_error", "message": f"{type(exc).__name__}: {exc}"}}
        with contextlib.suppress(BaseException):
            os.write(w, json.dumps(reply).encode())
        os._exit(0)
    os.close(w)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0)
    )
    try:
        data = await reader.read()
    finally:
        transport.close()
    await loop.run_in_executor(None, _reap, pid)
    reply = json.loads(data or b"{}")
    assert isinstance(reply, dict)
    return reply


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # the reaper loop may have been first
        os.waitpid(pid, 0)


def build_app() -> Any:
    from aiohttp import web

    async def dispatch(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None:
            return web.json_response(
                {"error": {"code": "backend_error", "message": "no peer"}}, status=400
            )
        _, uid, gid = peer_credentials(sock)
        if os.getuid() != 0 and uid not in (0, os.getuid()):
            err = CorralError(
                "this service serves only its own user", code=ErrorCode.BACKEND_UNAVAILABLE
            )
            return web.json_response(err.to_envelope(), status=403)
        try:
            params = await request.json()
        except ValueError:
            params = None
        if not isinstance(params, dict):
            err = CorralError("the body must be a JSON object", code=ErrorCode.MALFORMED_REQUEST)
            return web.json_response(err.to_envelope(), status=400)
        reply = await _run_as_peer(uid, gid, request.match_info["op"], params)
        return web.json_response(reply, status=200 if "result" in reply else 400)

    app = web.Application()
    app.router.add_post("/v1/{op}", dispatch)
    return app


def _reap_orphans() -> None:
    """Supervisors reparented to us (the service is a child subreaper) are reaped here."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


async def serve_forever(path: str | None = None) -> None:
    from aiohttp import web

    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    path = path or store.service_socket()
    if os.getuid() == 0:
        store.user_dir(0)  # creates the base directory with its 1733 mode
    gc.collect()  # leftovers of a previous crash
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    runner = web.AppRunner(build_app())
    await runner.setup()
    site = web.UnixSite(runner, path)
    await site.start()
    os.chmod(path, 0o666 if os.getuid() == 0 else 0o600)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, _reap_orphans)
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    try:
        await stopped
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
