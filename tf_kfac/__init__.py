"""tf_kfac: K-FAC, Kronecker-factored approximate natural-gradient descent, for Keras 3.

    import keras, tf_kfac
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5)

Importing tf_kfac routes `model.fit`'s default training step to K-FAC's for
models compiled with a `KFAC` optimizer; every other model trains as before.
"""

import keras as _keras
import tensorflow as _tf

from tf_kfac import _versions

_versions.check(_tf.__version__, _keras.__version__)

from tf_kfac import _keras_internals  # noqa: E402
from tf_kfac.blocks import register_block  # noqa: E402
from tf_kfac.fit import fit_train_step  # noqa: E402
from tf_kfac.hyperparameters import FISHER_ESTIMATORS  # noqa: E402
from tf_kfac.losses import SUPPORTED_LOSSES  # noqa: E402
from tf_kfac.optimizer import KFAC  # noqa: E402
from tf_kfac.saving import save_model  # noqa: E402

__version__ = "0.2.0.dev0"
__all__ = ["FISHER_ESTIMATORS", "KFAC", "SUPPORTED_LOSSES", "__version__", "register_block",
           "save_model"]


def _find_kfac(optimizer):
    candidate = _keras_internals.unwrap_optimizer(optimizer)
    return candidate if isinstance(candidate, KFAC) else None


_keras_internals.install_fit_hook(fit_train_step, _find_kfac)
