"""Multi-step HTTP jobs (docs/jobs.md): validation, the runner, credentials and redaction.

A job made of ``steps`` runs them in order. Each step is one HTTP request, retried after
``retry_exponent ** attempt`` seconds on network errors, timeouts, 5xx and 429, and failing the job
at once (:class:`StepFailed`) on any other status outside ``expect`` or when its attempts run out.
After every attempt the runner hands a :class:`Checkpoint` to ``save`` (the worker makes that a
write fenced by the lease); a job resumed from a checkpoint skips the steps that already succeeded.

Decisions the contract leaves open:

- **The allow-list** (``[http_steps] allow_hosts``; entries ``host``, ``host:port``, ``[v6]:port``
  or a bare IPv6 address) is matched against the host *as written in the URL* (lowercased, IDNA,
  trailing dot dropped), not against the address it resolves to: listing ``127.0.0.1:8080`` does
  not let ``localhost:8080`` through. An entry without a port allows every port.
  With a **non-empty** list, only listed hosts are reached at all, and a listed host may resolve
  to any address (listing an internal service is how an operator allows it). With an **empty**
  list, any host is allowed whose every resolved address is public: loopback, private
  (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7), link-local (169.254/16 including the cloud
  metadata address 169.254.169.254, fe80::/10), unspecified, multicast and reserved addresses are
  refused, also when they hide inside IPv4-mapped, 6to4 or NAT64 IPv6 addresses.
- **No DNS rebinding window.** arqd resolves the name itself, checks every address, and connects
  to exactly a checked address (the URL is rewritten to the IP literal; ``Host`` and the TLS
  server name stay the original host, so certificates are verified against it). A host with any
  refused address is refused whole.
- **Redirects** are followed by arqd, at most 5, and every hop is checked like the first. A
  redirect whose status is in the step's ``expect`` is not followed (it is the answer). 303 (and
  301/302 after a POST) continue as GET without a body, as browsers do. A redirect to another
  origin (scheme, host or port) carries on only the step headers of a small allow-list
  (``Accept``, ``Accept-Encoding``, ``Accept-Language``, ``Cache-Control``, ``Content-Language``,
  ``Content-Type``, ``User-Agent``) that the step does not mark secret: credentials and every
  other header stay with the origin they were written for, secret-looking or not. A 307/308 (or
  301/302 after a PUT, PATCH or DELETE) to another origin resends the body: if the body holds a
  secret field, the redirect is not followed and the step fails at once (``error.type``
  ``"RedirectRefused"``); stripping the field would send the other origin a request the job
  never asked for.
- **Secrets.** A value is secret when the step marks it (``"secret": {"headers": [names],
  "query": [names], "body": [JSON pointers]}``; every name must name something of the step, so a
  typo is a 422, not a leak) or when its name looks like one (``Authorization``, ``Cookie``,
  ``*token*``, ``*secret*``, ``*password*``, ``*api-key*``, a ``key`` or ``auth`` word, ...).
  Job credentials replace any ``Authorization`` header of a step. Secret values never reach a
  checkpoint, an error message, a log line, a ``repr`` or the job JSON (:func:`redact_steps`
  shows ``"[redacted]"``); a response that echoes one back has it replaced by ``"[redacted]"``
  (secrets shorter than 4 characters are not scrubbed from responses: that would shred every
  body). The job record holds the raw steps and the credentials only sealed (:func:`seal`,
  Fernet; see the keys below).
- **Keys.** The sealing keys are ``[http_steps] keys`` (seal with the first, open with any: how
  a key is rotated), else ``key``, else the file ``key_file`` (one key a line, the first seals),
  created on first use; its default is ``steps.key`` beside the sqlite database, so every daemon
  on that database finds the same one (:func:`step_keys`). A queue several hosts share
  (``QueueBackend.multi_host``) needs keys set explicitly, or a key file that already exists:
  :func:`check_keys` refuses to start, reload or pass ``check-config`` otherwise. The core reads
  the keys again whenever its config changes (SIGHUP). No key is ever logged or quoted.
- **Request and response bodies.** ``body`` is sent JSON-encoded (``Content-Type:
  application/json`` unless the step sets one); absent or ``null`` means no body. Response bodies
  are read up to 64 KiB: parsed JSON when the response says JSON and is complete, else text;
  a longer body is cut and its outcome carries ``"truncated": true``.
- **Attempts across crashes.** A step's attempts are counted in the checkpoint, so a step resumed
  while ``running`` continues its count; a step that had ``failed`` (a redriven job) starts over.
  A retry delay is capped at one hour (``retry_exponent ** attempt`` overflows quickly).

The package, one module per concept: the step spec and its validation are model level
(:mod:`arqd.stepmodel`, which ``arqd.config`` imports too); :mod:`~arqd.steps.keys` seals and
finds the keys, :mod:`~arqd.steps.redact` keeps secrets out of what is shown and kept,
:mod:`~arqd.steps.hosts` applies the allow-list, :mod:`~arqd.steps.checkpoint` is the progress
saved, and :mod:`~arqd.steps.runner` makes the requests. The errors (:class:`StepFailed`,
:class:`HostNotAllowed`, :class:`RedirectRefused`, :class:`CredentialsUnreadable`) are in
:mod:`arqd.errors`, under ``ArqdError``.
"""

from __future__ import annotations

from arqd.errors import CredentialsUnreadable, HostNotAllowed, RedirectRefused, StepFailed
from arqd.stepmodel import (
    Credentials,
    StepSecrets,
    StepSpec,
    parse_allow_hosts,
    parse_credentials,
    parse_steps,
)
from arqd.steps.checkpoint import Checkpoint, StepPhase
from arqd.steps.hosts import Resolver, is_public_address
from arqd.steps.keys import (
    check_keys,
    decrypt_credentials,
    encrypt_credentials,
    key_file,
    load_or_create_key,
    load_or_create_keys,
    new_key,
    read_keys,
    seal,
    step_keys,
    unseal,
)
from arqd.steps.redact import redact_steps
from arqd.steps.runner import BODY_LIMIT, MAX_REDIRECTS, run_steps

__all__ = [
    "BODY_LIMIT",
    "MAX_REDIRECTS",
    "Checkpoint",
    "Credentials",
    "CredentialsUnreadable",
    "HostNotAllowed",
    "RedirectRefused",
    "Resolver",
    "StepFailed",
    "StepPhase",
    "StepSecrets",
    "StepSpec",
    "check_keys",
    "decrypt_credentials",
    "encrypt_credentials",
    "is_public_address",
    "key_file",
    "load_or_create_key",
    "load_or_create_keys",
    "new_key",
    "parse_allow_hosts",
    "parse_credentials",
    "parse_steps",
    "read_keys",
    "redact_steps",
    "run_steps",
    "seal",
    "step_keys",
    "unseal",
]
