"""What a missing AWS credential looks like: the daemon's log, ``/readyz`` and ``arqd init-aws``
say in plain words that no credentials were found and where botocore looks for them, instead of
botocore's bare "Unable to locate credentials" (or "the dynamodb backend is not open")."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from .daemons import ROOT, Daemons, sqlite_config

pytestmark = pytest.mark.timeout(120)

# Everything botocore's credential chain reads, so that the chain finds nothing on any machine.
CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment in which botocore's chain finds no credentials (for child processes)."""
    for name in CHAIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role either


STEPS_KEY = "YXJxZC10ZXN0cy1zdGVwcy1rZXktbm90LXNlY3JldCE="  # a Fernet key, for tests only


def aws_config(tmp_path: Path, endpoint: str) -> str:
    """The process tests' config, with the queue on DynamoDB and results on S3 at ``endpoint``."""
    name = f"arqd-{uuid.uuid4().hex[:10]}"
    head, _, rest = sqlite_config(tmp_path).partition("[queue]")
    _, _, rest = rest.partition("[workers]")
    return (
        f'{head}[queue]\nbackend = "dynamodb"\ntable = "{name}"\nregion = "us-east-1"\n'
        f'endpoint_url = "{endpoint}"\n\n[results]\nbackend = "s3"\nbucket = "{name}"\n'
        f'region = "us-east-1"\nendpoint_url = "{endpoint}"\n\n[workers]{rest}'
        f'\n[http_steps]\nkey = "{STEPS_KEY}"\n'  # a queue shared by hosts needs a steps key
    )


def says_no_credentials(message: str) -> bool:
    return "no AWS credentials found" in message and "AWS_ACCESS_KEY_ID" in message


@pytest.mark.usefixtures("no_credentials")
async def test_daemon_without_credentials_says_so(tmp_path: Path, daemons: Daemons, moto_url: str):
    """With no credentials the daemon keeps listening, logs `daemon.backend_unavailable` naming
    the missing credentials and where they are looked for, and /readyz answers 503 saying so."""
    d = daemons.start(aws_config(tmp_path, moto_url), ready="daemon.listening")
    line = d.wait_log("daemon.backend_unavailable", 30)
    assert says_no_credentials(line["error"]), line
    async with aiohttp.ClientSession() as http, http.get(f"{d.url}/readyz") as resp:
        body = await resp.json()
    assert resp.status == 503
    assert body["error"]["code"] == "unavailable"
    assert says_no_credentials(body["error"]["message"]), body


def init_aws(tmp_path: Path, moto_url: str) -> subprocess.CompletedProcess[str]:
    """``arqd init-aws`` on a config naming the moto server, as a process."""
    config = tmp_path / "aws.toml"
    config.write_text(aws_config(tmp_path, moto_url))
    return subprocess.run(
        [sys.executable, "-m", "arqd", "init-aws", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.usefixtures("no_credentials")
def test_init_aws_without_credentials_says_so(tmp_path: Path, moto_url: str):
    """`arqd init-aws` with no credentials exits 1 with one line naming what is missing."""
    done = init_aws(tmp_path, moto_url)
    assert done.returncode == 1
    assert says_no_credentials(done.stderr), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.usefixtures("no_credentials")
def test_half_a_credential_is_named(tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch):
    """A key id without its secret is reported as partial credentials, naming the gap (botocore
    says this plainly already: pinned, so the translation keeps it)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    done = init_aws(tmp_path, moto_url)
    assert done.returncode == 1
    assert "Partial credentials" in done.stderr and "missing: AWS_SECRET_ACCESS_KEY" in done.stderr
    assert "Traceback" not in done.stderr
