"""One classification of boto3/botocore failures for every reader and writer of the store: a job
is retried (transient) or given up (permanent, configuration) for the same failure wherever the
worker meets it, S2 products, CARD inputs, DEM tiles, published CARD and the index cache alike."""

from __future__ import annotations

import pytest
from botocore import exceptions as bce

from cbmflow import store

URL = "s3://bucket/key"


def _client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("NoSuchKey", 404), FileNotFoundError),
        (_client_error("404", 404), FileNotFoundError),
        (_client_error("SlowDown", 503), store.StoreUnavailable),
        (_client_error("Throttling", 400), store.StoreUnavailable),
        (_client_error("RequestTimeout", 400), store.StoreUnavailable),
        (_client_error("", 429), store.StoreUnavailable),
        (_client_error("", 502), store.StoreUnavailable),
        (_client_error("AccessDenied", 403), store.StoreRefused),
        (_client_error("NoSuchBucket", 404), store.StoreRefused),
        (bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), store.StoreUnavailable),
        (bce.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), store.StoreUnavailable),
        (bce.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), store.StoreUnavailable),
        (bce.ResponseStreamingError(error="cut"), store.StoreUnavailable),
        (bce.IncompleteReadError(actual_bytes=1, expected_bytes=2), store.StoreUnavailable),
        (bce.FlexibleChecksumError(error_msg="crc32 mismatch"), store.StoreUnavailable),
        (bce.MetadataRetrievalError(error_msg="imds"), store.StoreUnavailable),
        (bce.NoCredentialsError(), store.StoreRefused),
        (bce.NoRegionError(), store.StoreRefused),
        (bce.ParamValidationError(report="bad bucket name"), store.StoreRefused),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.__name__,
)
def test_each_botocore_failure_has_one_class(exc: Exception, expected: type[OSError]) -> None:
    mapped = store.store_error(exc, URL)
    assert type(mapped) is expected
    assert URL in str(mapped)


def test_what_is_not_the_stores_is_left_to_the_caller() -> None:
    assert store.store_error(ValueError("a bug"), URL) is None
    assert store.store_error(OSError("disk full"), URL) is None
