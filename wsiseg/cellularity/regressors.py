"""Cellularity regressors with one sklearn-style contract.

``__init__`` only stores hyper-parameters; ``fit(X, y, X_val=None, y_val=None)`` returns
``self`` with the fitted state in attributes ending in ``_``; ``predict(X)`` returns (N,)
float64; ``save(path)`` / ``load(path)`` never pickle: a model is a file of the library's own
format plus a JSON sidecar.

:class:`LightGBMRegressor` is the paper's gradient-boosted trees on the 81 features
(Rakhlin et al. 2019, 4.3): regression with the MSE (L2) objective, learning rate 0.01, max depth
5, 8 leaves, 600 boosting rounds; with a validation set, training stops early when the
validation MSE has not improved for ``early_stopping_rounds`` rounds and the best iteration is
kept. ``save(path)`` writes ``<path>.txt`` (LightGBM's text model, best iteration only) and
``<path>.json`` (feature names, hyper-parameters, training metrics, versions).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "cellularity.lightgbm/1"


class LightGBMRegressor:
    """Gradient-boosted trees (LightGBM) from a feature matrix to cellularity in [0, 1].

    Hyper-parameters (defaults = the paper's): ``n_estimators`` 600 rounds,
    ``learning_rate`` 0.01, ``max_depth`` 5, ``num_leaves`` 8, objective ``"regression"`` (L2);
    ``min_child_samples`` 20 (LightGBM's default), ``early_stopping_rounds`` 100 (used only with
    a validation set), ``clip`` predictions to [0, 1], ``random_state`` 0, ``n_jobs`` threads
    (None = LightGBM's default), ``extra_params`` passed to LightGBM as they are.
    """

    def __init__(self, n_estimators: int = 600, learning_rate: float = 0.01, max_depth: int = 5,
                 num_leaves: int = 8, objective: str = "regression", min_child_samples: int = 20,
                 early_stopping_rounds: int = 100, clip: bool = True, random_state: int = 0,
                 n_jobs: int | None = None, extra_params: dict[str, Any] | None = None):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.num_leaves = num_leaves
        self.objective = objective
        self.min_child_samples = min_child_samples
        self.early_stopping_rounds = early_stopping_rounds
        self.clip = clip
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.extra_params = extra_params

    # ----------------------------------------------------------------------------------- params

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready)."""
        return {k: getattr(self, k) for k in ("n_estimators", "learning_rate", "max_depth", "num_leaves",
                                                "objective", "min_child_samples", "early_stopping_rounds",
                                                "clip", "random_state", "n_jobs", "extra_params")}

    def _lgb_params(self) -> dict[str, Any]:
        p = {
            "objective": self.objective,
            "metric": "l2",
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "seed": self.random_state,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }
        if self.n_jobs is not None:
            p["num_threads"] = self.n_jobs
        p.update(self.extra_params or {})
        return p

    # -------------------------------------------------------------------------------------- fit

    def fit(self, X, y, X_val=None, y_val=None, feature_names: Sequence[str] | None = None) -> LightGBMRegressor:
        """Train on ``X`` (N, F) float and ``y`` (N,) in [0, 1]; returns ``self``.

        ``X_val``/``y_val`` (M, F)/(M,): monitored each round; early stopping on their MSE.
        ``feature_names``: F unique names (default ``f0..``; pass ``features.FEATURE_NAMES``).
        Sets ``booster_``, ``feature_names_``, ``n_features_in_``, ``best_iteration_``,
        ``evals_result_`` (per-round l2 of ``train``/``val``) and ``train_metrics_``.
        """
        import lightgbm as lgb

        X = _as_matrix(X, "X")
        y = np.asarray(y, dtype=np.float64).ravel()
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows, y {len(y)} values")
        names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(X.shape[1])]
        if len(names) != X.shape[1] or len(set(names)) != len(names):
            raise ValueError(f"feature_names must be {X.shape[1]} unique names, got {len(names)}")
        has_val = X_val is not None and y_val is not None
        train = lgb.Dataset(X, label=y, feature_name=names, free_raw_data=True)
        sets, set_names = [train], ["train"]
        if has_val:
            Xv = _as_matrix(X_val, "X_val")
            yv = np.asarray(y_val, dtype=np.float64).ravel()
            if Xv.shape[1] != X.shape[1] or len(yv) != len(Xv):
                raise ValueError(f"X_val {Xv.shape} / y_val {yv.shape} do not match X {X.shape}")
            sets.append(lgb.Dataset(Xv, label=yv, reference=train))
            set_names.append("val")
        evals: dict = {}
        callbacks = [lgb.record_evaluation(evals)]
        if has_val and self.early_stopping_rounds:
            callbacks.append(lgb.early_stopping(self.early_stopping_rounds, first_metric_only=True, verbose=False))
        booster = lgb.train(self._lgb_params(), train, num_boost_round=self.n_estimators, valid_sets=sets,
                            valid_names=set_names, callbacks=callbacks)
        best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
        self.booster_ = booster
        self.feature_names_ = names
        self.n_features_in_ = X.shape[1]
        self.best_iteration_ = int(best)
        self.evals_result_ = {k: {m: [float(v) for v in vals] for m, vals in d.items()} for k, d in evals.items()}
        self.train_metrics_ = {"n_train": int(len(X)), "n_val": int(len(Xv)) if has_val else 0,
                               "best_iteration": self.best_iteration_,
                               "rounds_run": int(booster.current_iteration())}
        for k, d in self.evals_result_.items():
            self.train_metrics_[f"{k}_mse"] = d["l2"][best - 1]
        return self

    # ---------------------------------------------------------------------------------- predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise RuntimeError("this LightGBMRegressor is not fitted yet: call fit() or load() first")

    def predict(self, X) -> np.ndarray:
        """Cellularity of each row of ``X`` (N, F): (N,) float64, clipped to [0, 1] if ``clip``."""
        self._check_fitted()
        X = _as_matrix(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model was trained on {self.n_features_in_}")
        p = np.asarray(self.booster_.predict(X, num_iteration=self.best_iteration_), dtype=np.float64)
        return np.clip(p, 0.0, 1.0) if self.clip else p

    @property
    def feature_importances_(self) -> np.ndarray:
        """Total gain of the splits on each feature (best iteration): (F,) float64."""
        self._check_fitted()
        return np.asarray(self.booster_.feature_importance(importance_type="gain", iteration=self.best_iteration_),
                          dtype=np.float64)

    def importance_table(self) -> list[tuple[str, float]]:
        """``(name, gain)`` pairs, largest gain first."""
        imp = self.feature_importances_
        return [(self.feature_names_[i], float(imp[i])) for i in np.argsort(-imp, kind="stable")]

    def plot_importance(self, path: str | Path, top: int = 20, title: str | None = None) -> Path:
        """Horizontal bar chart of the ``top`` features by gain, written as a PNG (Agg canvas,
        no pyplot state). Returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = self.importance_table()[:top][::-1]
        fig = Figure(figsize=(7, 0.3 * len(rows) + 1.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.barh([r[0] for r in rows], [r[1] for r in rows], color="#8c2d04")
        ax.set_xlabel("total gain")
        ax.set_title(title or f"LightGBM feature importance (top {len(rows)})")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path

    # -------------------------------------------------------------------------------- save/load

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.txt`` (LightGBM text model) and ``<path>.json`` (sidecar); returns the .txt."""
        import lightgbm as lgb

        self._check_fitted()
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        model = stem.with_name(stem.name + ".txt")
        self.booster_.save_model(str(model), num_iteration=self.best_iteration_, importance_type="gain")
        meta = {
            "format": FORMAT,
            "model_file": model.name,
            "feature_names": self.feature_names_,
            "params": self.get_params(),
            "lightgbm_params": self._lgb_params(),
            "best_iteration": self.best_iteration_,
            "metrics": self.train_metrics_,
            "lightgbm_version": lgb.__version__,
        }
        stem.with_name(stem.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
        return model

    @classmethod
    def load(cls, path: str | Path) -> LightGBMRegressor:
        """Load what :meth:`save` wrote (``path`` = the stem, the .txt or the .json)."""
        import lightgbm as lgb

        stem = _stem(path)
        side = stem.with_name(stem.name + ".json")
        try:
            meta = json.loads(side.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{side}: sidecar not found (save() writes <stem>.txt and <stem>.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{side}: sidecar is not valid JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{side}: format {meta.get('format')!r} is not {FORMAT!r}")
        model = side.with_name(meta["model_file"])
        if not model.is_file():
            raise FileNotFoundError(f"{model}: LightGBM model file named by {side} not found")
        booster = lgb.Booster(model_file=str(model))
        if booster.feature_name() != meta["feature_names"]:
            raise ValueError(f"{model}: feature names differ from those in {side}")
        self = cls(**meta["params"])
        self.booster_ = booster
        self.feature_names_ = list(meta["feature_names"])
        self.n_features_in_ = len(self.feature_names_)
        self.best_iteration_ = int(meta["best_iteration"])
        self.train_metrics_ = meta.get("metrics", {})
        self.evals_result_ = {}
        return self


def _as_matrix(X, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{what} must be (N, F), got shape {X.shape}")
    return X


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".txt", ".json") else p
