"""Train a two-hidden-layer MLP on MNIST, log it to TensorBoard and export a SavedModel that TF Serving loads: the
notebook's command line for the demo's steps.

Example (the demo's tuned values; run from the repository root or from inside mnist_model/):

    python3 mnist.py --num_hidden_layer_1=192 --num_hidden_layer_2=64 --dropout=0.4905680409621578 \
        --learning_rate=0.09105850855225119 --epoch=2000

The work is done by five steps, each a module of small functions beside this file, run in this order:
load_data.py -> train.py -> evaluate.py -> export.py -> promote.py. They pass data only as files (npz, a model folder,
JSON), because the KFP pipelines (mnist_pipeline.py, mnist_pipeline_v2.py) run the very same modules as components,
each embedding its step's source verbatim, and the Katib trial (../mnist_hyper_tuning.py) runs them through run():
there is one definition of every step. promote serves the new version only if its test accuracy is at least
--min_accuracy and at least the served version's (plus --min_improvement); --force_export overrides it, and
`--retire N` takes version N out of service.

Meaning of the hyperparameters (the demo's names):
    --num_hidden_layer_1, --num_hidden_layer_2  units of the two hidden ReLU layers
    --dropout                                   KEEP probability of the dropout before the output layer (1.0 = none)
    --learning_rate                             peak learning rate of SGD with Nesterov momentum and cosine decay
    --epoch                                     number of training STEPS (mini-batches), not passes over the data

Serving contract of an exported version, <export_dir>/<version>/: export.py's docstring (signatures serving_default,
taking 784 raw pixels 0-255, and predict_image, taking PNG or JPEG bytes; outputs probabilities and digit; and
image_pixels, what predict_image classifies, for the drift monitor).
"""
import argparse
import json
import os
import sys
import tempfile

from promote import (PROMOTION_DEFAULTS, add_promotion_arguments, checked, non_negative_int, positive_int, promote,
                     promotion_rule_from, retire)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, 'data', 'mnist.npz')
DEFAULT_LOG_DIR = os.path.join('~', 'tensorboard', 'notebook')
HYPERPARAMETER_DEFAULTS = {
    'num_hidden_layer_1': 128,
    'num_hidden_layer_2': 256,
    'dropout': 1.0,
    'learning_rate': 0.01,
    'epoch': 2000,
    'batch_size': 256,
    'seed': 0,
}


def run(data, hparams, log_dir='', export_dir=None, model_version=0, rule=None):
    """Run load_data -> train -> evaluate [-> export -> promote into export_dir] in a temporary folder and return
    the results as a dict. rule holds promote()'s settings (PROMOTION_DEFAULTS overridden)."""
    # The steps import TensorFlow: loaded here, so that --help, --retire and a bad flag answer at once.
    from evaluate import evaluate
    from export import export
    from load_data import load_data
    from train import train

    hparams = {**HYPERPARAMETER_DEFAULTS, **hparams}
    with tempfile.TemporaryDirectory(prefix='mnist-') as work_dir:
        def path(name):
            return os.path.join(work_dir, name)

        load_data(data, path('dataset.npz'))
        # The same files as the pipeline's steps pass, and the trained model in memory besides.
        model = train(path('dataset.npz'), path('model'), log_dir=log_dir, **hparams)
        accuracy, loss = evaluate(path('dataset.npz'), path('model'), path('metrics.json'),
                                  path('evaluate-kfp-metrics.json'), path('evaluate-kfp-ui-metadata.json'),
                                  trained_model=model)
        with open(path('model/train.json')) as file:
            train_info = json.load(file)
        promotion = None
        if export_dir:
            export(path('model'), path('metrics.json'), path('export'), trained_model=model)
            promotion = promote(path('export'), path('dataset.npz'), export_dir, path('promote-kfp-metrics.json'),
                                path('promote-kfp-ui-metadata.json'), model_version=model_version,
                                **{**PROMOTION_DEFAULTS, **(rule or {})})
    version = promotion.model_version if promotion else None
    return {'accuracy': accuracy, 'loss': loss, 'promoted': bool(promotion and promotion.promoted),
            'decision': promotion.decision if promotion else None, 'model_version': version or None,
            'model_path': os.path.join(export_dir, str(version)) if version else None,
            'run_dir': train_info['tensorboard_run_dir'], 'train_seconds': train_info['train_seconds']}


def warn_if_near_chance(accuracy, learning_rate, epoch, prefix='mnist.py: '):
    """Print a warning to stderr when the test accuracy is near chance (<= 0.2; guessing one of ten digits scores
    0.1): training did not learn. The run still succeeds, because a Katib trial must record its result however poor."""
    if accuracy > 0.2:
        return
    # The trainer's progress lines come every 200 steps; a run shorter than that may simply have stopped too early.
    too_short = f', or --epoch {epoch} is too few steps' if epoch < 200 else ''
    print(f'{prefix}warning: test accuracy {accuracy:.4f} is near chance (0.1), so the model did not learn: '
          f'--learning_rate {learning_rate:g} is probably too high{too_short}', file=sys.stderr, flush=True)


def format_metrics(accuracy, loss):
    """The metric lines Katib's StdOut collector parses (and the only lines that name accuracy and loss so)."""
    return f'accuracy={accuracy:.6f}\nloss={loss:.6f}'


keep_probability = checked(float, 'a keep probability in (0, 1]', lambda value: 0.0 < value <= 1.0)
positive_float = checked(float, 'a number > 0', lambda value: 0.0 < value < float('inf'))


def add_hyperparameter_arguments(parser):
    """Add the five hyperparameters and --batch_size, --seed, --data: shared by this script and the Katib trial."""
    defaults = HYPERPARAMETER_DEFAULTS
    parser.add_argument('--num_hidden_layer_1', type=positive_int, default=defaults['num_hidden_layer_1'],
                        help='units in the first hidden ReLU layer, >= 1 (default: %(default)s)')
    parser.add_argument('--num_hidden_layer_2', type=positive_int, default=defaults['num_hidden_layer_2'],
                        help='units in the second hidden ReLU layer, >= 1 (default: %(default)s)')
    parser.add_argument('--dropout', type=keep_probability, default=defaults['dropout'],
                        help='KEEP probability of the dropout before the output layer, in (0, 1]; '
                             '1.0 disables dropout (default: %(default)s)')
    parser.add_argument('--learning_rate', type=positive_float, default=defaults['learning_rate'],
                        help='peak learning rate of SGD with Nesterov momentum 0.9 and cosine decay, > 0 '
                             '(default: %(default)s)')
    parser.add_argument('--epoch', type=positive_int, default=defaults['epoch'],
                        help='number of training STEPS (mini-batches, not passes over the data), >= 1 '
                             '(default: %(default)s)')
    parser.add_argument('--batch_size', type=positive_int, default=defaults['batch_size'],
                        help='examples per training step, >= 1 (default: %(default)s)')
    parser.add_argument('--seed', type=non_negative_int, default=defaults['seed'],
                        help='random seed for initial weights, shuffling and dropout, >= 0 (default: %(default)s)')
    parser.add_argument('--data', default=DEFAULT_DATA,
                        help='Keras-layout mnist.npz, or a folder of the four MNIST IDX files (gzipped or not) '
                             '(default: the bundled data/mnist.npz)')


def hyperparameters_from(args):
    """The hyperparameter values of parsed arguments, as the dict run() takes."""
    return {name: getattr(args, name) for name in HYPERPARAMETER_DEFAULTS}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='mnist.py', description=__doc__.split('\n\n')[0])
    add_hyperparameter_arguments(parser)
    parser.add_argument('--log_dir', default=DEFAULT_LOG_DIR,
                        help='TensorBoard folder; each run gets a subfolder; empty to disable (default: %(default)s)')
    parser.add_argument('--export_dir', default=HERE,
                        help='folder of the model versions, which TF Serving polls; empty to train without exporting '
                             '(default: this script\'s folder)')
    parser.add_argument('--model_version', type=positive_int, default=0,
                        help='integer version to export as (default: one more than any version there or retired)')
    add_promotion_arguments(parser)
    parser.add_argument('--retire', type=positive_int, metavar='N',
                        help='instead of training: take version N out of service (renamed to a hidden '
                             '.retired-N-<time> folder in --export_dir), so the previous version is served again')
    args = parser.parse_args(argv)
    if args.retire is not None:
        others = [f'--{name}' for name, value in vars(args).items()
                  if name not in ('retire', 'export_dir') and value != parser.get_default(name)]
        if others:
            parser.error(f'--retire takes only --export_dir, not {others[0]}')
        try:
            hidden_name, served, was_served = retire(args.export_dir, args.retire)
        except (ValueError, OSError) as error:
            print(f'mnist.py: error: {error}', file=sys.stderr)
            return 1
        # The version named is the one servers load now: the largest loadable one left.
        now = ('no loadable version is left to serve' if served is None
               else f'version {served} is served again (servers switch within their poll interval)' if was_served
               else f'version {served} stays in service')
        print(f'Retired version {args.retire}: renamed to {os.path.join(args.export_dir, hidden_name)}; {now}.')
        return 0

    if not args.export_dir and promotion_rule_from(args) != PROMOTION_DEFAULTS:
        parser.error('--min_accuracy, --min_improvement and --force_export apply to an export: --export_dir is empty')

    # TensorFlow's start-up notices say nothing the user can act on.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # Fail before training, not after it, on folders that cannot take the results.
    version_dir = os.path.join(args.export_dir, str(args.model_version))
    if args.model_version and os.path.exists(version_dir):
        print(f'mnist.py: error: {version_dir} already exists: choose another --model_version', file=sys.stderr)
        return 1
    for folder in (args.export_dir, os.path.expanduser(args.log_dir)):
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
                if not os.access(folder, os.W_OK):
                    raise PermissionError(f'{folder} is not writable')
        except OSError as error:
            print(f'mnist.py: error: cannot write to {folder}: {error}', file=sys.stderr)
            return 1
    try:
        result = run(args.data, hyperparameters_from(args), log_dir=args.log_dir, export_dir=args.export_dir,
                     model_version=args.model_version, rule=promotion_rule_from(args))
    except (ValueError, OSError) as error:
        print(f'mnist.py: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # promote says itself whether it had promoted the version when the interrupt came.
        print('mnist.py: interrupted', file=sys.stderr)
        return 130

    print(f'\nTest accuracy {result["accuracy"]:.4f}, loss {result["loss"]:.4f} '
          f'(training took {result["train_seconds"]:.1f} s)')
    if result['run_dir']:
        print(f'TensorBoard logs: {result["run_dir"]}  (view: tensorboard --logdir {args.log_dir})')
    if not args.export_dir:
        print('Model not exported (--export_dir is empty)')
    print(format_metrics(result['accuracy'], result['loss']), flush=True)
    warn_if_near_chance(result['accuracy'], args.learning_rate, args.epoch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
