"""scikit-learn's own estimator checks on the heads and the LightGBM comparator."""
from sklearn.utils.estimator_checks import parametrize_with_checks

from featpipe.bagging import FoldBag
from featpipe.comparators import LGBMEarlyStopping
from featpipe.heads import TorchHead

ESTIMATORS = [
    TorchHead(head="batchnorm", hidden=16, epochs=30, batch_size=32, device="cpu"),
    TorchHead(head="fc", epochs=30, batch_size=32, device="cpu"),
    TorchHead(head="fc", epochs=30, batch_size=32, members=2, device="cpu"),
    TorchHead(head="fc", epochs=30, batch_size=32, power=0.5, clip=True, device="cpu"),  # the tuned preset's input steps
    FoldBag(TorchHead(head="fc", epochs=30, batch_size=32, device="cpu"), folds=2),
    LGBMEarlyStopping(n_components=4, n_estimators=10, n_jobs=1),
]


def expected_failures(estimator) -> dict[str, str]:
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
