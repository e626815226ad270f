#!/bin/sh
# MLflow tracking server on PostgreSQL with artifacts in an S3 bucket (created here on first start).
set -eu
python - <<'PY'
import os, time
import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
bucket = os.environ["ARTIFACT_BUCKET"]
for _ in range(60):  # the object store may still be starting
    try:
        s3.head_bucket(Bucket=bucket)
        break
    except ClientError:
        s3.create_bucket(Bucket=bucket)
        break
    except EndpointConnectionError:
        time.sleep(2)
else:
    raise SystemExit(f"S3 endpoint {os.environ['MLFLOW_S3_ENDPOINT_URL']} did not answer")
PY
exec mlflow server \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "s3://$ARTIFACT_BUCKET" \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-4}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
