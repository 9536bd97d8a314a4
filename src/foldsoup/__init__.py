"""foldsoup: model soups over a hyperparameter grid x k cross-validation folds
(Suzuki & Matsuzawa, 2022). Kept import-free so every job starts fast."""

__version__ = "0.1.0"
