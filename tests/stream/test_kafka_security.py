"""Every Kafka / S3 security setting, changed through ``TERRADAPT_*``, changes what the clients are given.

Settings are loaded from the environment exactly as the workers load them (``load_settings``); the checks are on
what each client receives: kafka-python keyword arguments (``client_options``), the faust credentials and the
aiokafka arguments faust derives from them (``credentials_to_aiokafka_auth``, what every faust consumer, producer
and topic admin gets), the TLS context, and the MinIO client's connection pool. No services needed.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from serving.minio_store import minio_client
from stream.config import ConfigError, Settings, load_settings
from stream.kafka.security import client_options, faust_credentials, ssl_context

PASSWORD = "s3cret-pw-DO-NOT-LOG"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Settings from exactly these ``TERRADAPT_KAFKA__*`` / ``TERRADAPT_S3__*`` (the suite's service env removed)."""

    def setter(**values: str) -> Settings:
        for key in list(os.environ):
            if key.startswith(("TERRADAPT_KAFKA__", "TERRADAPT_S3__", "TERRADAPT_CONFIG")):
                monkeypatch.delenv(key)
        for key, value in values.items():
            monkeypatch.setenv(f"TERRADAPT_{key}", value)
        return load_settings()

    return setter


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a certificate + key it signed (what a client certificate for mutual TLS looks like)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(command: str) -> None:
        subprocess.run(["openssl", *command.split()], cwd=d, check=True, capture_output=True)

    openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=unit-test-CA -keyout ca.key -out ca.crt")
    openssl("req -new -newkey rsa:2048 -nodes -subj /CN=client -keyout client.key -out client.csr")
    openssl("x509 -req -days 2 -in client.csr -CA ca.crt -CAkey ca.key -set_serial 7 -out client.crt")
    return {"ca": d / "ca.crt", "cert": d / "client.crt", "key": d / "client.key"}


def _sasl_ssl(env, pki: dict[str, Path], **more: str) -> Settings:
    base = {
        "KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA__USERNAME": "alice",
        "KAFKA__PASSWORD": PASSWORD,
        "KAFKA__CA_FILE": str(pki["ca"]),
    }
    settings: Settings = env(**{**base, **more})
    return settings


def _ca_names(context: ssl.SSLContext) -> list[str]:
    """Common names of the CAs a TLS context trusts."""
    certs: list[dict[str, Any]] = context.get_ca_certs()
    return [value for cert in certs for rdn in cert["subject"] for key, value in rdn if key == "commonName"]


def test_plaintext_is_the_default_and_carries_no_security(env):
    kafka = env().kafka
    assert client_options(kafka) == {"bootstrap_servers": kafka.bootstrap, "security_protocol": "PLAINTEXT"}
    assert faust_credentials(kafka) is None
    assert credentials_to_aiokafka_auth(None) == {"security_protocol": "PLAINTEXT"}


def test_security_protocol_selects_tls_and_sasl_for_every_client(env, pki):
    ssl_only = env(KAFKA__SECURITY_PROTOCOL="SSL", KAFKA__CA_FILE=str(pki["ca"])).kafka
    opts = client_options(ssl_only)
    assert opts["security_protocol"] == "SSL" and opts["ssl_cafile"] == str(pki["ca"])
    assert "sasl_mechanism" not in opts
    creds = faust_credentials(ssl_only)
    assert isinstance(creds, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(creds)["security_protocol"] == "SSL"

    sasl_plain = env(KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA__USERNAME="alice", KAFKA__PASSWORD="p").kafka
    opts = client_options(sasl_plain)
    assert opts["security_protocol"] == "SASL_PLAINTEXT" and "ssl_cafile" not in opts
    auth = credentials_to_aiokafka_auth(faust_credentials(sasl_plain))
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["ssl_context"] is None

    sasl_ssl = _sasl_ssl(env, pki).kafka
    opts = client_options(sasl_ssl)
    assert opts["security_protocol"] == "SASL_SSL" and opts["ssl_cafile"] == str(pki["ca"])
    auth = credentials_to_aiokafka_auth(faust_credentials(sasl_ssl))
    assert auth["security_protocol"] == "SASL_SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert auth["sasl_plain_username"] == "alice" and auth["sasl_plain_password"] == PASSWORD


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_sasl_mechanism_reaches_kafka_python_and_aiokafka(env, pki, mechanism):
    kafka = _sasl_ssl(env, pki, KAFKA__SASL_MECHANISM=mechanism).kafka
    assert client_options(kafka)["sasl_mechanism"] == mechanism
    assert credentials_to_aiokafka_auth(faust_credentials(kafka))["sasl_mechanism"] == mechanism


def test_username_and_password_from_the_environment_or_a_secret_file(env, pki, tmp_path):
    kafka = _sasl_ssl(env, pki, KAFKA__USERNAME="bob").kafka
    assert client_options(kafka)["sasl_plain_username"] == "bob"
    assert client_options(kafka)["sasl_plain_password"] == PASSWORD

    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")  # a mounted secret often ends with a newline: not part of the password
    kafka = env(KAFKA__SECURITY_PROTOCOL="SASL_SSL", KAFKA__USERNAME="bob", KAFKA__PASSWORD_FILE=str(secret)).kafka
    assert client_options(kafka)["sasl_plain_password"] == "from-the-file"
    assert credentials_to_aiokafka_auth(faust_credentials(kafka))["sasl_plain_password"] == "from-the-file"


def test_sasl_without_credentials_is_refused_naming_the_variables(env):
    with pytest.raises(ConfigError, match="TERRADAPT_KAFKA__PASSWORD_FILE"):
        env(KAFKA__SECURITY_PROTOCOL="SASL_SSL", KAFKA__USERNAME="alice")
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        env(KAFKA__SECURITY_PROTOCOL="SSL", KAFKA__CERT_FILE="/x.crt")


def test_ca_file_is_the_trust_anchor_of_the_tls_context(env, pki):
    with_ca = _sasl_ssl(env, pki).kafka
    assert "unit-test-CA" in _ca_names(ssl_context(with_ca))
    assert ssl_context(with_ca).verify_mode == ssl.CERT_REQUIRED

    without_ca = env(KAFKA__SECURITY_PROTOCOL="SSL").kafka
    assert "ssl_cafile" not in client_options(without_ca)
    assert "unit-test-CA" not in _ca_names(ssl_context(without_ca))


def test_client_certificate_is_presented_for_mutual_tls(env, pki):
    kafka = _sasl_ssl(env, pki, KAFKA__CERT_FILE=str(pki["cert"]), KAFKA__KEY_FILE=str(pki["key"])).kafka
    opts = client_options(kafka)
    assert opts["ssl_certfile"] == str(pki["cert"]) and opts["ssl_keyfile"] == str(pki["key"])
    ssl_context(kafka)  # loads the pair: a mismatched or missing key raises here, at start-up
    broken = _sasl_ssl(env, pki, KAFKA__CERT_FILE=str(pki["cert"]), KAFKA__KEY_FILE=str(pki["ca"])).kafka
    with pytest.raises(ssl.SSLError):
        ssl_context(broken)


def test_check_hostname_only_drops_the_name_check(env, pki):
    strict = _sasl_ssl(env, pki).kafka
    assert client_options(strict)["ssl_check_hostname"] is True
    assert ssl_context(strict).check_hostname is True
    loose = _sasl_ssl(env, pki, KAFKA__CHECK_HOSTNAME="false").kafka
    assert client_options(loose)["ssl_check_hostname"] is False
    context = ssl_context(loose)
    assert context.check_hostname is False and context.verify_mode == ssl.CERT_REQUIRED  # chain still verified


def test_passwords_never_show_in_repr_or_logs(env, pki, caplog):
    caplog.set_level(logging.DEBUG)
    settings = _sasl_ssl(env, pki, S3__ACCESS_KEY="ak", S3__SECRET_KEY=PASSWORD)
    creds = faust_credentials(settings.kafka)
    client_options(settings.kafka)
    for text in (repr(settings), str(settings), repr(settings.kafka), repr(creds), str(creds), caplog.text):
        assert PASSWORD not in text
    assert "alice" in repr(creds)


def test_s3_ca_file_is_what_the_minio_client_verifies_against(env, pki):
    base = {"S3__ACCESS_KEY": "ak", "S3__SECRET_KEY": "sk", "S3__SECURE": "true"}
    with_ca = minio_client(env(**base, S3__CA_FILE=str(pki["ca"])).s3)
    assert with_ca._http.connection_pool_kw["ca_certs"] == str(pki["ca"])
    assert with_ca._http.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"
    default = minio_client(env(**base).s3)
    assert default._http.connection_pool_kw["ca_certs"] != str(pki["ca"])  # the system store (certifi)
    plain = minio_client(env(**{**base, "S3__SECURE": "false"}, S3__CA_FILE=str(pki["ca"])).s3)
    assert plain._base_url.is_https is False


def test_torchserve_handler_verifies_s3_against_the_ca_file(env, pki, monkeypatch):
    from serving.handler import TerradaptHandler

    env()  # the suite's service env removed
    for key, value in {"ENDPOINT": "127.0.0.1:1", "ACCESS_KEY": "ak", "SECRET_KEY": PASSWORD, "SECURE": "true"}.items():
        monkeypatch.setenv(f"TERRADAPT_S3__{key}", value)
    default = TerradaptHandler()._client()
    assert default._http.connection_pool_kw["ca_certs"] != str(pki["ca"])
    monkeypatch.setenv("TERRADAPT_S3__CA_FILE", str(pki["ca"]))
    handler = TerradaptHandler()
    client = handler._client()
    assert client._http.connection_pool_kw["ca_certs"] == str(pki["ca"])
    assert client._base_url.is_https
    assert PASSWORD not in repr(handler.__dict__)
