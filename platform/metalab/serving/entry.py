"""The served model's code, as MLflow's "models from code" takes it: the file is copied into every logged model
and run when one loads (``mlflow.pyfunc.load_model``), so loading unpickles no Python object, only reads
:mod:`metalab` (installed) and the model's artifacts."""

from mlflow.models import set_model

from metalab.serving.model import FewShotModel

set_model(FewShotModel())
