"""Sample quality on the embedded digits, judged by a classifier trained on the real digits.

    python scripts/digits_quality.py runs/digits/samples/samples_00003000_dpmpp_2m.npz

Samples (an ``.npz`` written by ``diffusion-jax sample``, values in [0, 1], shape (N, 8, 8, 1))
are put on the digits' 0..16 scale and scored by a calibrated RBF SVM fitted to the 1,500
training digits
(accuracy on the 297 test digits is printed as a reference):

* confidence: mean of the classifier's largest class probability (real test digits give the
  reference value);
* classes: how evenly the samples spread over the ten classes (entropy / log 10; 1 = uniform);
* a digits "Inception score", exp(E[KL(p(y|x) || p(y))]) (at most 10);
* nearest-neighbour distance to the training set, relative to that of real test digits (a value
  far below 1 would mean copies of training images).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.svm import SVC


def scores(images01: np.ndarray, clf, train: np.ndarray, test: np.ndarray) -> dict:
    x = np.clip(images01.reshape(len(images01), -1), 0.0, 1.0) * 16.0
    p = clf.predict_proba(x)
    py = p.mean(0)
    kl = np.sum(p * (np.log(p + 1e-12) - np.log(py + 1e-12)), axis=1)
    nn = np.sqrt(((x[:, None, :] - train[None]) ** 2).sum(-1)).min(1)
    nn_ref = np.sqrt(((test[:, None, :] - train[None]) ** 2).sum(-1)).min(1)
    return {
        "n": int(len(x)),
        "confidence": float(p.max(1).mean()),
        "class_entropy": float(-(py * np.log(py + 1e-12)).sum() / np.log(10)),
        "inception_score": float(np.exp(kl.mean())),
        "nn_distance_ratio": float(np.median(nn) / np.median(nn_ref)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="npz file with a 'samples' array in [0, 1]")
    args = parser.parse_args()
    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target
    train, test = x[:1500], x[1500:]
    clf = CalibratedClassifierCV(SVC(gamma=0.001, C=10.0), ensemble=False).fit(train, y[:1500])
    ref = scores(test / 16.0, clf, train, test)
    ref["test_accuracy"] = float((clf.predict(test) == y[1500:]).mean())
    samples = np.load(args.samples)["samples"]
    print(json.dumps({"samples": scores(samples, clf, train, test), "real_test_digits": ref}, indent=2))


if __name__ == "__main__":
    main()
