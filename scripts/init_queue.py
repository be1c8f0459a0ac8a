# Create the SQS queues the loader reads from, and optionally load the sample fixture.
#
# One script, two uses:
#   * LocalStack init hook (docker-compose.yaml mounts it as
#     /etc/localstack/init/ready.d/init_queue.py). LocalStack exec()s .py hooks inside its own
#     interpreter with empty globals, so there is no __name__/__file__ to rely on: main() is
#     called at top level, and errors are raised (never sys.exit) so that LocalStack marks the
#     hook ERROR in /_localstack/init instead of being taken down by SystemExit.
#   * No-Docker scripts: `$VENV/bin/python scripts/init_queue.py`, with VENV the LocalStack
#     virtualenv (any Python with boto3 will do). Exits 1 on error.
#
# Uses boto3 and the standard library only. Environment:
#   AWS_ENDPOINT_URL      endpoint (AWS_ENDPOINT_URL_SQS wins if set); default http://localhost:4566
#   AWS_REGION            region (then AWS_DEFAULT_REGION); default us-east-1
#   AWS_ACCESS_KEY_ID...  credentials; when neither keys nor AWS_PROFILE are set, test/test
#   LOADER_QUEUE          queue name; default login-queue
#   LOADER_DLQ            dead-letter queue name; default <LOADER_QUEUE>-dlq
#   LOADER_INIT_FIXTURE   JSON array file, each element sent as one message (compact JSON);
#                         unset: /fixtures/login-queue-sample.json if it exists; "": send nothing
#
# Idempotent for the queues: existing queues are reused; a missing redrive policy is added, a
# different one is left alone (with a warning). Sending the fixture is not: each run that names
# one sends it again. Requests always go to the configured endpoint: LocalStack's queue URLs name
# localhost.localstack.cloud, which need not resolve, and are only passed as QueueUrl parameters.
# Prints one line per action on stdout; never prints message bodies.

import json
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MAX_RECEIVE_COUNT = 5
BATCH_SIZE = 10  # SendMessageBatch limit
DEFAULT_FIXTURE = "/fixtures/login-queue-sample.json"
_MISSING_QUEUE_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


def say(message):
    print(f"init_queue: {message}", flush=True)


def sqs_client():
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_SQS") or env.get("AWS_ENDPOINT_URL") or "http://localhost:4566"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs = {}
    if not env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_PROFILE"):
        kwargs = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.client("sqs", endpoint_url=endpoint, region_name=region, config=config, **kwargs), endpoint


def existing_queue_url(sqs, name):
    try:
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in _MISSING_QUEUE_CODES:
            return None
        raise


def ensure_queue(sqs, name, attributes, what):
    url = existing_queue_url(sqs, name)
    if url is not None:
        say(f"{what} {name} exists")
        return url, False
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    say(f"created {what} {name}")
    return url, True


def queue_arn(sqs, url):
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def ensure_redrive(sqs, name, url, dlq_arn, redrive):
    current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    raw = current.get("Attributes", {}).get("RedrivePolicy")
    if not raw:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": redrive})
        say(f"set redrive policy on {name}: {dlq_arn}, maxReceiveCount {MAX_RECEIVE_COUNT}")
        return
    policy = json.loads(raw)
    if policy.get("deadLetterTargetArn") == dlq_arn and int(policy.get("maxReceiveCount", 0)) == MAX_RECEIVE_COUNT:
        say(f"redrive policy on {name} already points at {dlq_arn}")
    else:
        say(
            f"warning: {name} has redrive policy {policy.get('deadLetterTargetArn')} "
            f"maxReceiveCount {policy.get('maxReceiveCount')}; left unchanged"
        )


def fixture_path():
    path = os.environ.get("LOADER_INIT_FIXTURE")
    if path is None:
        return DEFAULT_FIXTURE if os.path.isfile(DEFAULT_FIXTURE) else None
    return path or None


def send_fixture(sqs, name, url, path):
    with open(path, encoding="utf-8") as fd:
        elements = json.load(fd)
    if not isinstance(elements, list):
        raise ValueError(f"{path}: expected a JSON array of message bodies")
    batches = 0
    for start in range(0, len(elements), BATCH_SIZE):
        entries = [
            {"Id": str(start + i), "MessageBody": json.dumps(element, separators=(",", ":"), ensure_ascii=False)}
            for i, element in enumerate(elements[start : start + BATCH_SIZE])
        ]
        result = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        failed = result.get("Failed") or []
        if failed:
            detail = "; ".join(f"element {f.get('Id')}: {f.get('Code')} {f.get('Message', '')}".strip() for f in failed)
            raise RuntimeError(f"sending {path} to {name}: {len(failed)} of {len(entries)} failed ({detail})")
        batches += 1
    say(f"sent {len(elements)} messages from {path} to {name} in {batches} batches")


def main():
    queue = os.environ.get("LOADER_QUEUE") or "login-queue"
    dlq = os.environ.get("LOADER_DLQ") or f"{queue}-dlq"
    if queue.endswith(".fifo") or dlq.endswith(".fifo"):
        raise ValueError("FIFO queues are not supported by this script")
    sqs, endpoint = sqs_client()
    say(f"endpoint {endpoint}")

    dlq_url, _ = ensure_queue(sqs, dlq, {}, "DLQ")
    dlq_arn = queue_arn(sqs, dlq_url)
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)})
    url, created = ensure_queue(sqs, queue, {"RedrivePolicy": redrive}, "queue")
    if not created:
        ensure_redrive(sqs, queue, url, dlq_arn, redrive)

    path = fixture_path()
    if path is None:
        say("no fixture to send")
    else:
        send_fixture(sqs, queue, url, path)


try:
    main()
except Exception as exc:
    print(f"init_queue: error: {exc}", file=sys.stderr, flush=True)
    if globals().get("__name__") == "__main__":
        sys.exit(1)
    raise  # inside LocalStack's hook runner: let it record the hook as failed
