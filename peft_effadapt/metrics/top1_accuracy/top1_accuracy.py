"""Top-1 accuracy in percent: the mean of exact matches of predicted and true class ids, times 100."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy in percent (100 * mean of predictions == references); 0.0 for no examples."
_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
Returns:
    accuracy (float): in percent.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Top1Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean() * 100.0) if len(references) else 0.0}
