"""A real S3 API on loopback for the tests: moto's server in its own process, with IAM checks on
(credentials that do not match are refused, as by AWS), and a forwarding proxy in front of it that
can fail chosen requests, as a store does under load.

The moto process is started and stopped by the fixture that uses it; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3

ALLOW_ALL = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'
#: Requests moto serves before it checks credentials: the IAM user and its key are made with these.
_UNCHECKED = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Store:
    """A running moto server: its URL and the access key of a user allowed everything."""

    url: str
    key_id: str
    secret: str

    def client(self, url: str | None = None, secret: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=url or self.url,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=secret or self.secret,
        )

    def env(self, url: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The environment a run gets: the endpoint and credentials as AWS tools read them, and
        nothing from this machine's AWS files."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GDAL_", "CPL_"))}
        env.update(
            AWS_ENDPOINT_URL=url or self.url,
            AWS_ACCESS_KEY_ID=self.key_id,
            AWS_SECRET_ACCESS_KEY=secret or self.secret,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_MAX_ATTEMPTS="3",  # boto3's retries, fewer than batchseg's default: a short test
        )
        return env


@contextlib.contextmanager
def moto_server() -> Iterator[Store]:
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_UNCHECKED))
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        iam.create_user(UserName="batchseg")
        iam.put_user_policy(UserName="batchseg", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="batchseg")["AccessKey"]
        yield Store(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FaultProxy:
    """Forwards every request to ``upstream``; a GET of an object whose key ends with a name in
    ``broken`` gets 500 every time, one in ``flaky`` gets 503 once. ``gets`` counts GETs per name,
    ``whole`` those without a Range header (the whole object). A GET of a name in ``held`` waits
    until ``release`` is set."""

    upstream: str
    broken: set[str] = field(default_factory=set)
    flaky: set[str] = field(default_factory=set)
    gets: dict[str, int] = field(default_factory=dict)
    whole: dict[str, int] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def fault(self, method: str, path: str, ranged: bool) -> int | None:
        name = path.split("?")[0].rsplit("/", 1)[-1]
        if method != "GET" or not name:
            return None
        self.gets[name] = self.gets.get(name, 0) + 1
        if not ranged:
            self.whole[name] = self.whole.get(name, 0) + 1
        if name in self.held:
            self.release.wait(60)
        if name in self.broken:
            return 500
        if name in self.flaky:
            self.flaky.discard(name)
            return 503
        return None


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    target = upstream.split("://", 1)[1]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = proxy.fault(self.command, self.path, "Range" in self.headers)
            if status is not None:
                payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(target, timeout=30)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host too: the signature covers it
                conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client killed mid-request (the test kills runs): nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.release.set()
        server.shutdown()
        server.server_close()
