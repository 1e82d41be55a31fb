"""The third step: measure the trained model's test accuracy and loss, and show them on the KFP run page.

evaluate() writes the results with the confusion matrix and the drift monitor's reference profile as JSON for the
export step, and as KFP v1 run metrics
(mlpipeline_metrics) and UI metadata (a confusion matrix and a markdown summary). The KFP components embed this
module's source verbatim (mnist_pipeline.py, mnist_pipeline_v2.py).

    python3 -c "import evaluate; print(evaluate.evaluate('/tmp/dataset.npz', '/tmp/model', '/tmp/metrics.json',
        '/tmp/kfp-metrics.json', '/tmp/kfp-ui.json'))"   # from mnist_model/, after load_data and train
"""
from __future__ import annotations

import collections
import json
import os
from typing import TYPE_CHECKING, NamedTuple

import keras
import numpy as np

import drift

if TYPE_CHECKING:
    # As in load_data.py: the kfp annotations stay strings at run time.
    from kfp.components import InputPath, OutputPath

EvaluateOutputs = collections.namedtuple('EvaluateOutputs', ['accuracy', 'loss'])


def predict(model, images, batch_size=2000):
    """The model's probabilities for rows of 784 pixels, batch by batch, so that only one batch at a time is held as
    float32."""
    return np.concatenate([np.asarray(model(images[start:start + batch_size].astype(np.float32), training=False))
                           for start in range(0, len(images), batch_size)])


def measure(probabilities, digits):
    """Accuracy, loss and the confusion matrix (true digit by predicted digit) of probabilities for the true digits."""
    predictions = probabilities.argmax(axis=1)
    accuracy = float(np.mean(predictions == digits))
    # The same clipping as Keras' cross-entropy, so this equals model.evaluate's loss.
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(digits)), digits], 1e-7, 1.0))))
    confusion = np.bincount(digits * 10 + predictions, minlength=100).reshape(10, 10)
    return accuracy, loss, confusion


def write_json(path, content):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as file:
        json.dump(content, file, indent=2)


def run_page_outputs(accuracy, loss, confusion, hyperparameters, test_examples):
    """The KFP v1 run page's metrics and UI metadata (a confusion matrix and a markdown summary)."""
    metrics = {'metrics': [
        {'name': 'accuracy', 'numberValue': round(100 * accuracy, 4), 'format': 'PERCENTAGE'},
        {'name': 'loss', 'numberValue': round(loss, 6), 'format': 'RAW'},
    ]}
    rows = '\n'.join(f'| {name} | {value} |' for name, value in hyperparameters.items())
    summary = (f'## MNIST MLP\n\nTest accuracy **{accuracy:.2%}**, loss {loss:.4f} on {test_examples} test images.\n\n'
               f'| hyperparameter | value |\n|---|---|\n{rows}\n')
    ui_metadata = {'outputs': [
        {'type': 'confusion_matrix', 'format': 'csv', 'storage': 'inline',
         'schema': [{'name': 'target', 'type': 'CATEGORY'}, {'name': 'predicted', 'type': 'CATEGORY'},
                    {'name': 'count', 'type': 'NUMBER'}],
         'labels': [str(digit) for digit in range(10)],
         'source': ''.join(f'{target},{predicted},{confusion[target, predicted]}\n'
                           for target in range(10) for predicted in range(10))},
        {'type': 'markdown', 'storage': 'inline', 'source': summary},
    ]}
    return metrics, ui_metadata


def evaluate(dataset_path: InputPath('npz'), model_path: InputPath('Model'), metrics_path: OutputPath('JSON'),
             mlpipeline_metrics_path: OutputPath('Metrics'), mlpipeline_ui_metadata_path: OutputPath('UI_metadata'),
             trained_model=None) -> NamedTuple('EvaluateOutputs', [('accuracy', float), ('loss', float)]):
    """Measure test accuracy (a fraction) and loss; write them with the confusion matrix to metrics_path, and as
    KFP v1 run metrics and UI metadata (a confusion matrix and a summary) for the pipeline's run page.
    trained_model is the model train() returned when the steps run in one process (mnist.run); without it the model
    is loaded from model_path. (It is not an input of the pipeline's component: files travel there.)"""
    with np.load(dataset_path, allow_pickle=False) as dataset:
        x_test, y_test = dataset['x_test'].reshape(-1, 784), dataset['y_test'].astype(np.int64)
    model = (trained_model if trained_model is not None
             else keras.models.load_model(os.path.join(model_path, 'model.keras')))
    with open(os.path.join(model_path, 'train.json')) as file:
        train_info = json.load(file)
    probabilities = predict(model, x_test)
    accuracy, loss, confusion = measure(probabilities, y_test)
    # The drift monitor's reference (drift.py, docs/monitoring.md): what the model saw and said on these test digits;
    # export writes it to assets.extra/profile.json.
    write_json(metrics_path, {'accuracy': accuracy, 'loss': loss, 'test_examples': len(y_test),
                              'confusion_matrix': confusion.tolist(),
                              'profile': drift.compute_profile(x_test, probabilities)})
    run_metrics, ui_metadata = run_page_outputs(accuracy, loss, confusion, train_info['hyperparameters'],
                                                len(y_test))
    write_json(mlpipeline_metrics_path, run_metrics)
    write_json(mlpipeline_ui_metadata_path, ui_metadata)
    return EvaluateOutputs(accuracy, loss)
