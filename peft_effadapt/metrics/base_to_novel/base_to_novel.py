"""CoOp's base-to-novel protocol: accuracy on base-class examples, on novel-class examples (each problem with its own
class ids), and their harmonic mean HM = 2 B N / (B + N), all in percent."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = ("Base accuracy, novel accuracy and their harmonic mean (percent). Each example says whether it belongs "
                "to the novel problem; base and novel predictions are ids within their own problem's classes.")
_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    novel (list of bool): True for examples of the novel-class problem.
Returns:
    base (float), novel (float): accuracies in percent (0.0 for a problem without examples).
    hm (float): 2 * base * novel / (base + novel), 0.0 when both are 0.
"""


def _accuracy(predictions, references) -> float:
    return float((predictions == references).mean() * 100.0) if len(references) else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BaseToNovel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64"),
                                        "novel": datasets.Value("bool")}),
        )

    def _compute(self, predictions, references, novel):
        predictions, references, novel = np.asarray(predictions), np.asarray(references), np.asarray(novel, bool)
        base = _accuracy(predictions[~novel], references[~novel])
        new = _accuracy(predictions[novel], references[novel])
        return {"base": base, "novel": new, "hm": 0.0 if base + new == 0 else 2.0 * base * new / (base + new)}
