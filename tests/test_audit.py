"""GDPR Art. 30 / accountability: every command appends one JSON Lines audit record (time UTC,
command, actor, outcome, counts, output URIs), failures included, with no image content,
image source paths or credentials."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from canestra.cli import commands as cli
from canestra.errors import InputError
from canestra.privacy import audit


@pytest.fixture(autouse=True)
def isolated_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    monkeypatch.setenv("CANESTRA_ACTOR", "dpo-ticket-4711")


def test_success_record_fields(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    extra = tmp_path / "central" / "audit.jsonl"
    with audit.audited("predict", out=str(out), audit_log=str(extra)):
        audit.note(predicted=12, quarantined=1,
                   outputs=[str(out / "predictions"), "s3://AKIAXXXX:hunter2@bucket/run?X-Amz-Signature=abc"])
    (rec,) = audit.read_records(str(out / "_audit" / "audit.jsonl"))
    assert audit.read_records(str(extra)) == [rec]
    assert rec["command"] == "predict" and rec["status"] == "ok" and rec["exit_code"] == 0
    assert rec["actor"] == "dpo-ticket-4711"
    when = dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
    assert rec["time"].endswith("Z") and when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 120
    assert rec["counts"] == {"predicted": 12, "quarantined": 1}
    assert rec["outputs"] == [str(out / "predictions"), "s3://bucket/run"]
    text = json.dumps(rec)
    assert "hunter2" not in text and "AKIA" not in text and "Signature" not in text


def test_failure_is_recorded_by_class_without_the_message(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError):
        with audit.audited("train", out=str(out)):
            raise InputError(f"images folder {tmp_path}/Mario Rossi/holiday does not exist")
    (rec,) = audit.read_records(str(out / "_audit" / "audit.jsonl"))
    assert rec["status"] == "error" and rec["error"] == "InputError" and rec["exit_code"] == 2
    assert "Mario Rossi" not in json.dumps(rec)


def test_actor_defaults_to_the_os_user(tmp_path, monkeypatch):
    import getpass

    monkeypatch.delenv("CANESTRA_ACTOR")
    with audit.audited("ingest", out=str(tmp_path)):
        pass
    (rec,) = audit.read_records(str(tmp_path / "_audit" / "audit.jsonl"))
    assert rec["actor"] == getpass.getuser()


def test_cli_failure_before_spark_is_audited_without_paths(tmp_path, monkeypatch, capsys):
    log = tmp_path / "central.jsonl"
    monkeypatch.setenv("CANESTRA_AUDIT_LOG", str(log))
    images = tmp_path / "Mario Rossi photos"
    code = cli.main(["train", "--images", str(images), "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a failed command does not create --out just to log"
    (rec,) = audit.read_records(str(log))
    assert rec["command"] == "train" and rec["status"] == "error" and rec["error"] == "InputError"
    assert "Mario Rossi" not in log.read_text() and str(tmp_path) not in log.read_text()


def test_cli_failure_without_any_log_goes_to_the_user_log(tmp_path, capsys):
    code = cli.main(["erase", "--out", str(tmp_path / "missing"), "--image-id", "0" * 64])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (rec,) = audit.read_records(str(tmp_path / "state" / "canestra" / "audit.jsonl"))
    assert rec["command"] == "erase" and rec["error"] == "InputError"


def test_audit_log_flag_and_every_command_logged(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "_logs").mkdir(parents=True)
    (out / "_logs" / "spark.log").write_text("")  # a canestra output: purge refuses any other folder
    extra = tmp_path / "extra.jsonl"
    assert cli.main(["purge", "--out", str(out), "--older-than", "7", "--audit-log", str(extra)]) == 0
    assert cli.main(["gdpr", "record", "--out", str(out)]) == 0
    local = audit.read_records(str(out / "_audit" / "audit.jsonl"))
    assert [r["command"] for r in local] == ["purge", "gdpr record"]
    assert [r["command"] for r in audit.read_records(str(extra))] == ["purge"]
    assert local[1]["outputs"] == [str(out / "_gdpr" / "record-of-processing.md"),
                                   str(out / "_gdpr" / "record-of-processing.json")]


def test_concurrent_appends_stay_whole_lines(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    payload = "x" * 5000  # larger than a pipe buffer: torn writes would show

    def writer(n: int) -> None:
        for i in range(50):
            audit.append_record(path, {"writer": n, "i": i, "pad": payload})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = audit.read_records(path)
    assert len(records) == 200 and {(r["writer"], r["i"]) for r in records} == {(n, i) for n in range(4) for i in range(50)}
