import pytest

from stream.config import ConfigError, load_settings


def test_env_overrides_file_and_secrets_stay_hidden(tmp_path, monkeypatch):
    cfg = tmp_path / "local.toml"
    cfg.write_text('[kafka]\nbootstrap = "127.0.0.1:1"\n[adaptation]\nmethod = "tent"\n')
    monkeypatch.setenv("TERRADAPT_KAFKA__BOOTSTRAP", "127.0.0.1:2")
    monkeypatch.setenv("TERRADAPT_S3__SECRET_KEY", "do-not-print")
    monkeypatch.setenv("TERRADAPT_RUN_DIR", "/tmp/x")  # a service-script variable, not a setting
    s = load_settings(cfg)
    assert s.kafka.bootstrap == "127.0.0.1:2"
    assert s.adaptation.method == "tent"
    assert s.s3.secret_key is not None and s.s3.secret_key.get_secret_value() == "do-not-print"
    assert "do-not-print" not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TERRADAPT_KAFKA__BOOTSTRAPP": "x"}, "fields of \\[kafka\\] are bootstrap"),
        ({"TERRADAPT_NOPE__X": "1"}, "sections are adaptation"),
        ({"TERRADAPT_ADAPTATION__METHOD": "zzz"}, "accepted: adda, bn, bn-balanced, coral, .*tent"),
    ],
)
def test_unknown_or_bad_env_keys_are_rejected(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_unknown_key_in_file_is_rejected(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[monitor]\nert = 500\nwindoww = 3\n")
    with pytest.raises(ConfigError, match=r"monitor\.windoww"):
        load_settings(cfg)


def test_shipped_config_files_load(monkeypatch):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].glob("deploy/config/*.toml")):
        settings = load_settings(path)
        assert settings.kafka.bootstrap.startswith("127.0.0.1")


def test_per_region_method_from_file_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "regions.toml"
    cfg.write_text('[adaptation.per_region.D013]\nmethod = "tent"\nmethod_config = { lr = 0.0001 }\n')
    s = load_settings(cfg)
    assert s.adaptation.method_for("D013").method == "tent"
    assert s.adaptation.method_for("D013").method_config == {"lr": 0.0001}
    assert s.adaptation.method_for("D067").method == "bn-balanced"
    monkeypatch.setenv("TERRADAPT_ADAPTATION__PER_REGION", '{"D067": {"method": "eata"}}')
    assert load_settings().adaptation.method_for("D067").method == "eata"
    cfg.write_text('[adaptation.per_region.D013]\nmethod = "nope"\n')
    monkeypatch.delenv("TERRADAPT_ADAPTATION__PER_REGION")
    with pytest.raises(ConfigError, match="accepted: adda, bn"):
        load_settings(cfg)
