# Publish message bodies to an SQS queue the way production deployments wrap them, through the
# real services (LocalStack with SERVICES=sqs,sns,events, or AWS): an SNS topic the queue is
# subscribed to, or an EventBridge rule that targets the queue.
#
#   python scripts/envelopes.py sns QUEUE_URL FILE [--raw]   # raw message delivery on/off
#   python scripts/envelopes.py events QUEUE_URL FILE
#
# FILE is a JSON array; each element is published as one message (compact JSON): as the SNS
# Message, or as the EventBridge event's detail. The topic and the rule are named after the
# queue and created when missing. Uses boto3 and the standard library only; the endpoint,
# region and credentials as scripts/init_queue.py takes them. Prints how many were published;
# never a body.

import json
import os
import sys

import boto3
from botocore.config import Config


def client(service):
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "http://localhost:4566")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    keys = {}
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        keys = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    return boto3.client(service, endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"max_attempts": 3}), **keys)


def queue_arn(queue_url):
    sqs = client("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    return attrs["Attributes"]["QueueArn"]


def name_of(queue_arn_value):
    return queue_arn_value.rsplit(":", 1)[1].replace(".fifo", "")


def via_sns(queue_url, bodies, raw):
    sns = client("sns")
    arn = queue_arn(queue_url)
    topic = sns.create_topic(Name="loader-" + name_of(arn))["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                  Attributes={"RawMessageDelivery": "true" if raw else "false"},
                  ReturnSubscriptionArn=True)
    for body in bodies:
        sns.publish(TopicArn=topic, Message=body, Subject="login",
                    MessageAttributes={"origin": {"DataType": "String", "StringValue": "test"}})
    return len(bodies)


def via_events(queue_url, bodies):
    events = client("events")
    arn = queue_arn(queue_url)
    rule = "loader-" + name_of(arn)
    source = "loader.test." + name_of(arn)
    events.put_rule(Name=rule, EventPattern=json.dumps({"source": [source]}), State="ENABLED")
    events.put_targets(Rule=rule, Targets=[{"Id": "queue", "Arn": arn}])
    sent = 0
    for i in range(0, len(bodies), 10):
        chunk = bodies[i:i + 10]
        out = events.put_events(Entries=[
            {"Source": source, "DetailType": "login", "Detail": body} for body in chunk])
        if out.get("FailedEntryCount"):
            raise RuntimeError("EventBridge refused %d entries" % out["FailedEntryCount"])
        sent += len(chunk)
    return sent


def main(argv):
    if len(argv) < 4 or argv[1] not in ("sns", "events"):
        print(__doc__ or "usage: envelopes.py sns|events QUEUE_URL FILE [--raw]", file=sys.stderr)
        return 2
    with open(argv[3]) as f:
        bodies = [json.dumps(b, separators=(",", ":")) for b in json.load(f)]
    if argv[1] == "sns":
        sent = via_sns(argv[2], bodies, "--raw" in argv[4:])
    else:
        sent = via_events(argv[2], bodies)
    print("published %d messages via %s" % (sent, argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
