"""C-SGD (Centripetal SGD, Ding et al., CVPR 2019): clusters, the centripetal gradient, and the Trainer callback."""

from .callback import CentripetalSGDCallback
from .clusters import (
           CLUSTER_METHODS,
           biased_clusters,
           clusters_to_labels,
           even_clusters,
           form_clusters,
           kmeans_clusters,
)
from .config import CSGDConfig
from .optim import csgd_param_groups
from .update import centripetal_gradient, cluster_deviation, cluster_means, max_cluster_gap

__all__ = ["CLUSTER_METHODS", "CSGDConfig", "CentripetalSGDCallback", "biased_clusters", "centripetal_gradient",
           "cluster_deviation", "cluster_means", "clusters_to_labels", "csgd_param_groups", "even_clusters",
           "form_clusters", "kmeans_clusters", "max_cluster_gap"]
