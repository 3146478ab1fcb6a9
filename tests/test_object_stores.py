"""Object stores for every command (issue 12, item 1), against a real S3 server (moto's, on loopback):
inputs, store and eval data on S3 with storage options from the command line or the config; the three
usual mistakes (wrong endpoint, missing bucket, no credentials) as one line naming the URL and the
setting; secrets kept out of the saved config. No AWS_* variable is set: the options alone must work."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from _extract_fixtures import decoded, make_teachers, write_tars  # noqa: E402
from conftest import PIPELINE_TOML, tiny_overrides  # noqa: E402

from distill.cli import main as distill_main  # noqa: E402
from extract.cli import main as extract_main  # noqa: E402
from store_schema.storage import REDACTED, options_for, storage_overrides  # noqa: E402
from store_schema.store import FeatureStore  # noqa: E402

pytestmark = pytest.mark.slow  # a server and several runs: ~1 min on a busy 2-core machine

FORMATS = {"mae": "mae", "mocov3": "mocov3", "ibot": "ibot"}
DEAD = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
FEW_RETRIES = "config_kwargs.retries.max_attempts=1"  # botocore's retries would only make the dead endpoint slow


@pytest.fixture(scope="module")
def s3():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="bucket")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    yield {"endpoint": endpoint, "client": client, "options": options}
    server.stop()


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch, tmp_path):
    """Credentials and endpoint come from the options under test only, never from the environment."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup for credentials
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()


def cli_options(s3) -> list[str]:
    return ["--storage-option", f"endpoint_url={s3['endpoint']}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing", "--storage-option", "client_kwargs.region_name=us-east-1"]


def sets(tmp_path: Path, urls: list[str], store: str, extra: list[str] = ()) -> list[str]:
    make_teachers(tmp_path)
    over = tiny_overrides(tmp_path) + ["data.urls=" + json.dumps(urls), f"store.root={json.dumps(store)}",
                                       "data.max_failure_fraction=1.0", 'heads.adapter_init="random"']
    over += [f'teachers.{t}.format="{f}"' for t, f in FORMATS.items()] + list(extra)
    return [a for o in over for a in ("--set", o)]


def upload(s3, tars: list[Path], prefix: str) -> list[str]:
    for p in tars:
        s3["client"].upload_file(str(p), "bucket", f"{prefix}/{p.name}")
    return [f"s3://bucket/{prefix}/{p.name}" for p in tars]


@pytest.fixture(scope="module")
def extracted(s3, tmp_path_factory):
    """Inputs listed by an @list file on S3, read and written to a store on S3 with --storage-option only."""
    tmp = tmp_path_factory.mktemp("objstore")
    tars = write_tars(tmp, [5, 4])
    urls = upload(s3, tars, "data")
    s3["client"].put_object(Bucket="bucket", Key="lists/train.txt", Body="\n".join(urls).encode())
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    argv = ["--config", str(PIPELINE_TOML), *cli_options(s3), *sets(tmp, ["@s3://bucket/lists/train.txt"],
                                                                      "s3://bucket/stores/a")]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        code = extract_main(argv)
    return {"code": code, "tmp": tmp, "tars": tars, "urls": urls, "root": "s3://bucket/stores/a"}


def test_extract_reads_s3_inputs_and_writes_an_s3_store_with_cli_storage_options(s3, extracted):
    assert extracted["code"] == 0
    store = FeatureStore.open(extracted["root"], storage_options=s3["options"])
    units = {u.source: u for u in store.units()}
    assert sorted(units) == sorted(extracted["urls"])
    for tar, url in zip(extracted["tars"], extracted["urls"]):
        rec = store.unit_record(units[url].name)
        assert rec["keys"] == list(decoded(tar))  # every sample of the tar, in order
        assert rec["source_id"]["size"] == tar.stat().st_size and rec["source_id"]["etag"]  # read with the options


def test_saved_config_keeps_the_endpoint_but_not_the_secrets(s3, extracted):
    saved = FeatureStore.open(extracted["root"], storage_options=s3["options"]).meta["config"]
    for section in ("store", "data", "eval"):
        so = saved[section]["storage_options"]
        assert so["endpoint_url"] == s3["endpoint"] and so["client_kwargs"] == {"region_name": "us-east-1"}
        assert so["key"] == REDACTED and so["secret"] == REDACTED


def test_distill_trains_and_evaluates_from_s3(s3, extracted, tmp_path):
    tmp = extracted["tmp"]
    common = ["--config", str(PIPELINE_TOML), *cli_options(s3),
              *sets(tmp, ["@s3://bucket/lists/train.txt"], extracted["root"],
                    ["train.steps=2", "train.checkpoint_every=2", f"train.run_dir={json.dumps(str(tmp_path / 'run'))}",
                     "eval.train_urls=" + json.dumps(extracted["urls"][:1]),
                     "eval.test_urls=" + json.dumps(extracted["urls"][1:]), "eval.probe_epochs=1", "eval.knn_k=[1]"])]
    assert distill_main(["train", *common]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").is_file()
    out = tmp_path / "eval.json"
    assert distill_main(["eval", *common, "--random-init", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_train"] == 5 and result["n_test"] == 4  # every sample, read from S3


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_wrong_endpoint_of_the_store_is_one_line_naming_url_and_setting(s3, tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    argv = ["--config", str(PIPELINE_TOML), *sets(tmp_path, [str(tars[0])], "s3://bucket/stores/dead", [
        f'store.storage_options.endpoint_url="{DEAD}"', "store.storage_options." + FEW_RETRIES,
        'store.storage_options.key="testing"', 'store.storage_options.secret="testing"'])]
    assert extract_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://bucket/stores/dead" in line and "store.storage_options.endpoint_url" in line and DEAD in line


def test_wrong_endpoint_of_the_inputs_is_one_line_before_any_work(s3, tmp_path, capsys):
    argv = ["--config", str(PIPELINE_TOML), *sets(tmp_path, ["s3://bucket/data/x-{000000..000003}.tar"],
                                                  str(tmp_path / "store"), [
        f'data.storage_options.endpoint_url="{DEAD}"', "data.storage_options." + FEW_RETRIES,
        'data.storage_options.key="testing"', 'data.storage_options.secret="testing"'])]
    assert extract_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://bucket/data/x-000000.tar" in line and "data.storage_options.endpoint_url" in line
    assert not (tmp_path / "store").exists()  # refused before the store was created


def test_missing_bucket_is_one_line_naming_it(s3, tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    argv = ["--config", str(PIPELINE_TOML), *cli_options(s3),
            *sets(tmp_path, [str(tars[0])], "s3://no-such-bucket/store")]
    assert extract_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://no-such-bucket/store" in line and "bucket 'no-such-bucket' does not exist" in line
    # training from it: the same sentence, not "no store here, run comad-extract"
    assert distill_main(["train", "--config", str(PIPELINE_TOML), *cli_options(s3),
                         *sets(tmp_path, [str(tars[0])], "s3://no-such-bucket/store")]) == 2
    assert "bucket 'no-such-bucket' does not exist" in _one_line_error(capsys)


def test_comad_store_names_the_missing_bucket(s3, capsys):
    from store_schema.cli import main as store_main
    assert store_main(["inspect", "s3://no-such-bucket/store", f"--storage-option=endpoint_url={s3['endpoint']}",
                       "--storage-option=key=testing", "--storage-option=secret=testing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bucket 'no-such-bucket' does not exist" in err
    assert "--storage-option endpoint_url=" in err and "no store at" not in err


def test_eval_data_on_a_wrong_endpoint_is_one_line_naming_eval_storage_options(s3, tmp_path, capsys):
    make_teachers(tmp_path)
    argv = ["eval", "--config", str(PIPELINE_TOML), "--random-init", "0", "--out", str(tmp_path / "e.json"),
            *sets(tmp_path, [str(tmp_path / "unused.tar")], str(tmp_path / "store"), [
                'eval.train_urls=["s3://bucket/eval/train.tar"]', 'eval.test_urls=["s3://bucket/eval/test.tar"]',
                f'eval.storage_options.endpoint_url="{DEAD}"', "eval.storage_options." + FEW_RETRIES,
                'eval.storage_options.key="testing"', 'eval.storage_options.secret="testing"'])]
    assert distill_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://bucket/eval/train.tar" in line and "eval.storage_options.endpoint_url" in line


def test_missing_credentials_is_one_line_naming_the_settings(s3, tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    argv = ["--config", str(PIPELINE_TOML), "--storage-option", f"endpoint_url={s3['endpoint']}",
            *sets(tmp_path, [str(tars[0])], "s3://bucket/stores/nocreds")]
    assert extract_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://bucket/stores/nocreds" in line and "no credentials" in line
    assert "AWS_ACCESS_KEY_ID" in line and "store.storage_options.key" in line


def test_refused_credentials_are_one_line(s3, tmp_path, capsys, monkeypatch):
    import moto.settings
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks every signature
    tars = write_tars(tmp_path, [2])
    argv = ["--config", str(PIPELINE_TOML), *sets(tmp_path, [str(tars[0])], "s3://bucket/stores/refused", [
        f'store.storage_options.endpoint_url="{s3["endpoint"]}"', 'store.storage_options.key="nobody"',
        'store.storage_options.secret="wrong"'])]
    assert extract_main(argv) == 2
    line = _one_line_error(capsys)
    assert "s3://bucket/stores/refused" in line and "refused the credentials" in line
    assert "store.storage_options.key" in line and "wrong" not in line  # the secret is not echoed


def test_malformed_storage_option_is_one_line(tmp_path, capsys):
    assert extract_main(["--config", str(PIPELINE_TOML), "--storage-option", "endpoint_url"]) == 2
    assert "--storage-option 'endpoint_url' must look like KEY=VALUE" in _one_line_error(capsys)


def test_options_go_to_remote_urls_only_and_the_command_line_sets_every_section():
    opts = {"endpoint_url": "http://h:9000"}
    assert options_for("/data/a.tar", opts) == {} and options_for("file:///data/a.tar", opts) == {}
    assert options_for("pipe:cat a.tar", opts) == {} and options_for("s3://b/a.tar", opts) == opts
    assert storage_overrides(["endpoint_url=http://h:9000", "anon=true"]) == [
        f'{s}.storage_options.{k}' for s in ("store", "data", "eval") for k in ('endpoint_url="http://h:9000"',
                                                                              "anon=true")]


# ---------------------------------------------------------------------------------------------- pipe: URLs

def _read(url: str):
    from store_schema.shards import iter_tar
    return list(iter_tar(url, 89478485))


def _same(a, b) -> bool:
    from store_schema.shards import Sample
    if type(a) is not type(b) or (a.index, a.key) != (b.index, b.key):
        return False
    if isinstance(a, Sample):
        return a.label == b.label and a.note == b.note and a.image.tobytes() == b.image.tobytes()
    return a.reason == b.reason


def test_pipe_url_reads_the_same_samples_as_the_file(tmp_path):
    tar = write_tars(tmp_path, [4])[0]
    by_file, by_pipe = _read(str(tar)), _read(f"pipe:cat {tar}")
    assert len(by_file) == 4 and all(_same(a, b) for a, b in zip(by_file, by_pipe)) and len(by_pipe) == 4


def test_pipe_cut_short_is_a_truncated_tar_as_for_a_file(tmp_path):
    from wds_fixtures import member_offsets
    tar = write_tars(tmp_path, [4])[0]
    offset, _ = sorted(member_offsets(tar).values())[2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:offset + 10])
    by_file, by_pipe = _read(str(cut)), _read(f"pipe:head -c {offset + 10} {tar}")
    assert by_pipe[-1].key is None and "truncated or corrupt tar" in by_pipe[-1].reason
    assert len(by_file) == len(by_pipe) and all(_same(a, b) for a, b in zip(by_file, by_pipe))


@pytest.mark.parametrize("command,expected", [("cat {tar}; exit 3", "exited with status 3"),
                                              ("cat {missing}", "exited with status 1"),
                                              ("head -c 3000 {tar}; exit 7", "exited with status 7")])
def test_pipe_command_failing_is_an_io_error_of_that_tar(tmp_path, command, expected):
    from store_schema.shards import ShardReadError
    tar = write_tars(tmp_path, [3])[0]
    url = "pipe:" + command.format(tar=tar, missing=tmp_path / "missing.tar")
    with pytest.raises(ShardReadError, match=expected) as info:
        _read(url)
    assert info.value.url == url  # the unit of this URL fails, and the next run retries it


def test_extraction_from_pipe_urls_stores_every_sample(tmp_path):
    from _extract_fixtures import extract_config

    from extract.pipeline import run_extraction
    from store_schema.store import unit_name
    tars = write_tars(tmp_path, [3, 2])
    pattern = f"pipe:cat {tmp_path}/data/train-{{000000..000001}}.tar"  # brace-expanded like any URL
    cfg = extract_config(tmp_path, tars, ["data.urls=" + json.dumps([pattern])])
    summary = run_extraction(cfg)
    assert summary["errors"] == [] and summary["images"] == 5
    store = FeatureStore.open(cfg.store.root)
    for tar in tars:
        rec = store.unit_record(unit_name(f"pipe:cat {tar}"))
        assert rec["keys"] == list(decoded(tar)) and rec.get("source_id") is None  # a command has no size/mtime
