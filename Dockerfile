# The demo's custom notebook image jupyter/mnist-tensorflow-cpu: Kubeflow's jupyter-tensorflow (CPU) notebook image
# plus this repository's pinned requirements, with the repository itself at /opt/mlops-demo so that Katib trials can
# run `python3 /opt/mlops-demo/mnist_hyper_tuning.py` from the same image (the bundled data included: no network).
#
#   docker build -t <registry>/jupyter/mnist-tensorflow-cpu:1.0.0 .
#   docker push <registry>/jupyter/mnist-tensorflow-cpu:1.0.0
FROM kubeflownotebookswg/jupyter-tensorflow:v1.9.2

# The base image ships tensorflow 2.15; requirements.txt pins tensorflow-cpu 2.20, which installs into the same
# `tensorflow` package folder, so remove the old distribution first rather than having two claim it.
COPY --chown=jovyan:users requirements.txt requirements-base.txt /tmp/
RUN python3 -m pip uninstall --yes --quiet tensorflow \
 && python3 -m pip install --quiet --no-cache-dir -r /tmp/requirements.txt \
 && rm -f /tmp/requirements.txt /tmp/requirements-base.txt

COPY --chown=jovyan:users . /opt/mlops-demo
