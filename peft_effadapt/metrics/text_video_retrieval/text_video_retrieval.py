"""Text-video retrieval metrics from a square similarity matrix (texts x videos, pair i is the truth): R@1/5/10 in
percent, median rank (MdR), mean rank (MnR) and R-Sum = R@1 + R@5 + R@10, text->video (rows) and video->text
(columns). Ranks are 1-based; ties count in the query's favour."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "R@1/5/10 (%), MdR, MnR and R-Sum for text->video ('t2v_') and video->text ('v2t_') retrieval."
_KWARGS = """
Args:
    predictions (list of list of float): row i = similarities of text i to every video (a square matrix).
    references (list of int): the true video of each text; must be 0..n-1 in order (pair i is the truth).
Returns:
    t2v_R@1, t2v_R@5, t2v_R@10, t2v_MdR, t2v_MnR, t2v_R-Sum and the same with 'v2t_' (float).
"""


def _ranks(similarity: np.ndarray) -> np.ndarray:
    return (similarity > np.diag(similarity)[:, None]).sum(1) + 1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TextVideoRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        sim = np.asarray(predictions, dtype=np.float64)
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"text_video_retrieval needs a square texts x videos matrix, got shape {sim.shape}.")
        if not np.array_equal(np.asarray(references), np.arange(len(sim))):
            raise ValueError("text_video_retrieval: references must be 0..n-1 in order (pair i is the truth).")
        out = {}
        for prefix, matrix in (("t2v", sim), ("v2t", sim.T)):
            ranks = _ranks(matrix)
            recalls = {k: float((ranks <= k).mean() * 100) for k in (1, 5, 10)}
            out.update({f"{prefix}_R@{k}": v for k, v in recalls.items()})
            out[f"{prefix}_MdR"] = float(np.median(ranks))
            out[f"{prefix}_MnR"] = float(ranks.mean())
            out[f"{prefix}_R-Sum"] = sum(recalls.values())
        return out
