"""One TLS rule (GDPR Art. 32) for every AWS endpoint: s3:// data paths and `canestra deploy aws`
accept and refuse the same endpoints."""

from __future__ import annotations

import pytest

from canestra.cli import main
from canestra.errors import InputError
from canestra.storage.s3 import S3Options

CASES = [  # endpoint, --allow-http-endpoint, accepted?, words of the refusal
    ("https://s3.eu-west-3.amazonaws.com", False, True, ""),
    ("http://127.0.0.1:9000", False, False, "--allow-http-endpoint"),
    ("http://127.0.0.1:9000", True, True, ""),
    ("http://localhost:9000", True, True, ""),
    ("http://10.1.2.3:9000", True, False, "loopback"),
    ("http://s3.example.com", True, False, "loopback"),
    ("ftp://127.0.0.1", True, False, "https://"),
    ("s3.eu-west-3.amazonaws.com", False, False, "https://"),
]


@pytest.mark.parametrize("endpoint, allow_http, accepted, words", CASES)
def test_s3_paths_and_deploy_share_the_endpoint_rule(capsys, endpoint, allow_http, accepted, words):
    opts = S3Options(endpoint_url=endpoint, allow_http_endpoint=allow_http)
    if accepted:
        opts.check_endpoint()
    else:
        with pytest.raises(InputError, match=words.replace("+", r"\+")):
            opts.check_endpoint()
    argv = ["deploy", "aws", "--region", "eu-west-3", "--bucket", "canestra-demo-bucket", "--dry-run",
            "--endpoint-url", endpoint] + (["--allow-http-endpoint"] if allow_http else [])
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == (0 if accepted else 2), err
    assert words in err
