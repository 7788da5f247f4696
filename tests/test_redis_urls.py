"""Redis URL forms as hosted providers hand them out, read the same by the machine's own client (resp.py) as by
redis-py (workers, CLI): a unix socket, ?db= and ?password= in the query, rediss:// with its TLS options (a
TLS-terminating proxy with a private CA in front of a real server), a db path that is no number. Real servers,
real TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import threading

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import find_server_binary, free_port, server_argv, wait_for_ping
from emp_machine.runtime.resp import MiniRedis
from harness import wait_for

PY = sys.executable


@pytest.fixture
def socket_server(tmp_path):
    """A private server on a unix socket (and a loopback port, for set-up): (socket path, port)."""
    sock, port = tmp_path / "r.sock", free_port()
    proc = subprocess.Popen(server_argv(find_server_binary(), port, tmp_path) + ["--unixsocket", str(sock),
                                                                                  "--unixsocketperm", "700"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_ping("127.0.0.1", port, 10)
        yield sock, port
    finally:
        proc.terminate()
        proc.wait(10)


def _mini(url: str, *command):
    async def run():
        client = MiniRedis(url)
        try:
            return await client.execute(*command)
        finally:
            await client.aclose()
    return asyncio.run(run())


def test_a_machine_runs_jobs_on_a_unix_socket_redis(socket_server, machine_factory):
    # redis-py's unix socket connection refused the workers' socket_keepalive at its first command: every
    # worker crash-looped with a TypeError, while the machine said Redis was reachable.
    sock, _ = socket_server
    url = f"unix://{sock}"
    machine = machine_factory("workers:\n  sim:\n    connector: simulation\n    count: 1\n", redis_url=url)
    machine.wait_ready(30)
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    job = JobStore(client).submit("simulation", {"steps": 1, "step_ms": 1})
    wait_for(lambda: client.hget(f"job:{job}", "status") == "completed", 30, message="the job completed")
    assert "Traceback" not in machine.log_of("worker-0")


def test_the_machines_client_reads_the_query_as_redis_py_does(socket_server):
    sock, port = socket_server
    admin = redis_lib.Redis(port=port)
    admin.execute_command("ACL", "SETUSER", "emp", "on", ">p@ss w", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "on", ">d3fault")
    admin.execute_command("ACL", "SETUSER", "alice", "on", "nopass", "~*", "&*", "+@all")
    for url, user in ((f"redis://emp:p%40ss%20w@127.0.0.1:{port}/2?db=3", "emp"),  # ?db= over the path's db
                      (f"redis://127.0.0.1:{port}/1?username=emp&password=p%40ss%20w&db=3", "emp"),
                      (f"unix://{sock}?password=d3fault&db=3", "default"),
                      (f"redis://alice@127.0.0.1:{port}/3", "alice")):  # a user with no password
        seen = redis_lib.Redis.from_url(url).client_info()
        assert (seen["db"], seen["user"]) == (3, user)
        info = _mini(url, "CLIENT", "INFO")
        assert "db=3" in info and f" user={user} " in info, url


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A private CA and a server certificate for localhost / 127.0.0.1 it signed: (ca.pem, server.pem, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test CA")
    d = tmp_path_factory.mktemp("tls")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)  # noqa: E731
    # The extensions Python 3.13's default context checks (VERIFY_X509_STRICT): a CA's key usage, a leaf's
    # authority key identifier
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=emp test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def tls_port(tls_files, redis_server):
    """A TLS-terminating proxy on a loopback port in front of the suite's server (as a hosted Redis is)."""
    _, cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    target = redis_lib.Redis.from_url(redis_server.url).connection_pool.connection_kwargs["port"]

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        async def shut():  # the pipes end (and close their writers) before the loop stops, not after it closed
            server.close()
            pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_machines_client_takes_the_tls_options_of_the_url(tls_port, tls_files):
    ca, _, _ = tls_files
    base = f"rediss://localhost:{tls_port}/0"
    # a private CA: not trusted by default, and the reason is said (never the URL)
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        _mini(base, "PING")
    # the options redis-py takes from the query: the machine could not connect with them
    assert _mini(f"{base}?ssl_ca_certs={ca}", "PING") == "PONG"
    assert _mini(f"{base}?ssl_cert_reqs=none", "PING") == "PONG"
    assert redis_lib.Redis.from_url(f"{base}?ssl_ca_certs={ca}").ping()  # as the workers and the CLI read it
    with pytest.raises(ConnectionError, match="ssl_cert_reqs must be none, optional or required"):
        _mini(f"{base}?ssl_cert_reqs=maybe", "PING")


@pytest.mark.parametrize("url, problem", [
    ("redis://127.0.0.1:6379/abc", "not a db number"),
    ("redis://127.0.0.1:6379/0?db=x", "?db= is not a number"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe'"),
    ("redis://127.0.0.1:6379/0?db=-1", "negative db"),
    # redis-py hands TLS options to its plain connection, which refuses them: every worker crash-looped
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "not rediss://"),
])
def test_a_redis_url_the_machine_and_its_workers_would_read_apart_is_refused_by_validate(tmp_path, url, problem):
    # a db path that is no number passed validation, then the machine failed at boot with a traceback
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"redis:\n  url: '{url}'\n")
    result = subprocess.run([PY, "-m", "emp_machine", "validate", str(manifest)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_says_why_redis_is_not_reachable(tmp_path):
    # it printed the exception's class alone ("ConnectionError") for a refused connection and a certificate
    # that did not verify alike
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    result = subprocess.run([PY, "-m", "emp_machine", "stuck", "--redis", url], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "not reachable: ConnectionError: " in result.stderr and "refused" in result.stderr.lower()
    assert "s3cret" not in result.stderr + result.stdout


def test_workers_are_given_the_machines_ca_settings():
    from emp_machine.runtime.plan import BASE_ENV_KEYS

    assert {"SSL_CERT_FILE", "SSL_CERT_DIR"} <= set(BASE_ENV_KEYS)
