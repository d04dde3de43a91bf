"""Connection options of every Kafka client terradapt builds, from ``KafkaConfig``: one place for TLS and SASL.

kafka-python clients (ingest producer, adaptation worker, topic admin, test consumers) take ``client_options``;
the faust stream worker (aiokafka underneath) takes ``faust_credentials``. Both read the same settings, so a
protocol, mechanism, user, password (or password file), CA or client certificate set once reaches every client.
Credentials come from the settings (environment or a secret file) and are never logged: faust's credential
objects print the user only, and nothing here logs.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from terradapt.settings import KafkaConfig

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """Keyword arguments for ``KafkaProducer`` / ``KafkaConsumer`` / ``KafkaAdminClient`` (kafka-python 3.x)."""
    opts: dict[str, Any] = {"bootstrap_servers": config.bootstrap, "security_protocol": config.security_protocol}
    if config.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = config.sasl_mechanism
        opts["sasl_plain_username"] = config.username
        opts["sasl_plain_password"] = config.sasl_password()
    if config.uses_tls:
        opts["ssl_check_hostname"] = config.check_hostname
        if config.ca_file is not None:
            opts["ssl_cafile"] = str(config.ca_file)
        if config.cert_file is not None and config.key_file is not None:
            opts["ssl_certfile"] = str(config.cert_file)
            opts["ssl_keyfile"] = str(config.key_file)
    return opts


def ssl_context(config: KafkaConfig) -> ssl.SSLContext:
    """The TLS context of an SSL / SASL_SSL connection: the broker's certificate is always verified.

    ``ca_file`` replaces the system CA store when set (a private CA); ``check_hostname`` only drops the name check,
    never the chain check; ``cert_file`` + ``key_file`` add a client certificate (mutual TLS).
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file) if config.ca_file is not None else None
    )
    context.check_hostname = config.check_hostname
    if config.cert_file is not None and config.key_file is not None:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context


def faust_credentials(config: KafkaConfig) -> CredentialsT | None:
    """``broker_credentials`` of a ``faust.App`` (None for PLAINTEXT); faust hands them to every aiokafka client.

    SASL_SSL and SASL_PLAINTEXT become ``faust.SASLCredentials`` (with a TLS context for SASL_SSL), SSL becomes
    ``faust.SSLCredentials``. aiokafka 0.14 speaks PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512.
    """
    import faust  # the stream worker's dependency only: kafka-python clients never import it

    if config.security_protocol == "PLAINTEXT":
        return None
    if config.security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(config))
    return faust.SASLCredentials(
        username=config.username,
        password=config.sasl_password(),
        mechanism=config.sasl_mechanism,
        ssl_context=ssl_context(config) if config.uses_tls else None,
    )
