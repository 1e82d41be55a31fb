"""Read the model server's two configuration files in TensorFlow Serving's protobuf text format.

`--monitoring_config_file` holds a MonitoringConfig and `--batching_parameters_file` a BatchingParameters message,
written exactly as for `tensorflow_model_server` (comments, `field: {`, commas between fields are all accepted):

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

    max_batch_size { value: 32 }
    batch_timeout_micros { value: 1000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 2 }

The messages are declared here with only the fields this server acts on, so protobuf's own text parser rejects any
other field (TF Serving's `allowed_batch_sizes`, `thread_pool_name`, ...) with a line that names it, rather than
accepting a setting that would then be ignored.

Example:
    python3 mnist_model/model_server.py --monitoring_config_file=mnist_model/monitoring.config \
        --batching_parameters_file=batching.config
"""

import argparse
import functools
import typing

DEFAULT_PROMETHEUS_PATH = '/monitoring/prometheus/metrics'


class ConfigError(Exception):
    """A configuration file that cannot be used; the message is one line naming the file and the problem."""


class BatchingParameters(typing.NamedTuple):
    """The batching knobs, and their values when a file leaves them out: TF Serving's defaults, except that one
    batch runs at a time rather than one per CPU (on 2 cores, 8 clients got 2 300 requests/s with one and 1 800 with
    two; docs/serving.md)."""
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1


@functools.cache
def message_classes():
    """Build the MonitoringConfig and BatchingParameters message classes from their field lists.

    They live in a private descriptor pool, so they cannot clash with protobuf types TensorFlow registers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field_type = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file_proto = descriptor_pb2.FileDescriptorProto(name='model_server_config.proto', package='tensorflow.serving',
                                                    syntax='proto3', dependency=['google/protobuf/wrappers.proto'])
    prometheus = file_proto.message_type.add(name='PrometheusConfig')
    prometheus.field.add(name='enable', number=1, type=field_type.TYPE_BOOL, label=field_type.LABEL_OPTIONAL)
    prometheus.field.add(name='path', number=2, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
    monitoring = file_proto.message_type.add(name='MonitoringConfig')
    monitoring.field.add(name='prometheus_config', number=1, type=field_type.TYPE_MESSAGE,
                         type_name='.tensorflow.serving.PrometheusConfig', label=field_type.LABEL_OPTIONAL)
    batching = file_proto.message_type.add(name='BatchingParameters')
    for number, name in enumerate(BatchingParameters._fields, start=1):
        # The field numbers are TF Serving's: max_batch_size = 1, ..., num_batch_threads = 4.
        batching.field.add(name=name, number=number, type=field_type.TYPE_MESSAGE,
                           type_name='.google.protobuf.Int64Value', label=field_type.LABEL_OPTIONAL)
    pool.Add(file_proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'tensorflow.serving.{name}'))
            for name in ('MonitoringConfig', 'BatchingParameters')}


def parse_text_file(path, message_name, flag):
    """Parse a protobuf text file into a new message of the given type, or raise ConfigError."""
    from google.protobuf import text_format

    try:
        with open(path, encoding='utf-8') as config_file:
            text = config_file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f'{flag} {path}: cannot read it: {getattr(error, "strerror", None) or error}') from None
    message = message_classes()[message_name]()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ConfigError(f'{flag} {path}: {error} (this server reads {describe_fields(message)})') from None
    return message


def describe_fields(message):
    return ', '.join(field.name for field in message.DESCRIPTOR.fields)


def read_monitoring_config(path):
    """Return the path to serve Prometheus metrics at, or None when the file leaves them disabled."""
    config = parse_text_file(path, 'MonitoringConfig', '--monitoring_config_file')
    if not config.HasField('prometheus_config') or not config.prometheus_config.enable:
        return None
    metrics_path = config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH
    if not metrics_path.startswith('/') or metrics_path.startswith('/v1/') or '?' in metrics_path:
        raise ConfigError(f'--monitoring_config_file {path}: prometheus_config.path must start with "/", not with '
                          f'"/v1/" (the REST API) and hold no "?", got {metrics_path!r}')
    return metrics_path


def read_batching_parameters(path):
    """Return the BatchingParameters of a file; fields it leaves out keep their defaults."""
    message = parse_text_file(path, 'BatchingParameters', '--batching_parameters_file')
    values = {}
    for name in BatchingParameters._fields:
        if message.HasField(name):
            value = getattr(message, name).value
            lowest = 0 if name == 'batch_timeout_micros' else 1
            if value < lowest:
                raise ConfigError(f'--batching_parameters_file {path}: {name} must be >= {lowest}, got {value}')
            values[name] = value
    return BatchingParameters(**values)


# Types of command-line flags: each refuses a bad value with one line that says what it expected.

def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}') from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}')
    return value


def positive_float(text):
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f'expected a number > 0, got {text!r}')
    return value


def port_number(text):
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f'expected a port 0-65535, got {text!r}')
    return int(text)


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
    return int(text)


def non_negative_int(text):
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    return int(text)


def boolean(text):
    """TF Serving's boolean flags: --flag, --flag=true or --flag=false."""
    if text.lower() in ('true', '1'):
        return True
    if text.lower() in ('false', '0'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')
