"""Gather the assignment's deliverables into one document to hand in: <out-dir>/report.md with its images
beside it, and the same content as <out-dir>/report.pdf (one figure per page).

    python report.py                          # all runs in . and visualization/; writes report/
    python report.py --gan-dir runs/gan128    # jobs/README's layout: baseline in ., GAN in runs/gan128,
                                              # visualization/ (with progress.gif in it) from jobs/visualize.*
    python report.py --baseline-dir runs/b --gan-dir runs/g --vis-dir runs/vis --out-dir runs/report

What it reads:
    --baseline-dir   baseline_metrics.jsonl (train_baseline.py)
    --gan-dir        gan_metrics.jsonl and output/NNN.png (train_gan.py); the generator-quality records of
                     train_gan.py --eval-every K in the metrics, and eval.json (evaluate.py), when present
    --vis-dir        one folder per discriminator as visualize.py writes them (cifar10/, discriminator/)
    --gif            make_gif.py's animation; by default the first of <gan-dir>/progress.gif and
                     <vis-dir>/progress.gif that exists (jobs/visualize.* write the latter)

A part whose inputs are missing, an image that cannot be decoded and metrics lines cut short are named in the
document and by the command, and the rest of the report is still made; the parts the assignment does not ask
for are marked optional; the exit status is 0. Everything is rendered in memory first, then each file is
written to a temporary name and renamed, report.pdf last: a failed write (one line, exit 2) or a kill leaves
the previous report.pdf as it was.
"""
import argparse
import os

from reporting.inputs import gather
from reporting.pages import (Document, gap_lines, write_curves, write_generator, write_health, write_max_class,
                          write_max_features, write_perturbation, write_quality, write_summary)
from torch_utils.cli import check_range, run_main
from torch_utils.files import output_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-dir", default=".",
                        help="train_baseline.py's --out-dir: baseline_metrics.jsonl (default: .)")
    parser.add_argument("--gan-dir", default=".",
                        help="train_gan.py's --out-dir: gan_metrics.jsonl, output/NNN.png (default: .)")
    parser.add_argument("--vis-dir", default="visualization",
                        help="visualize.py's --out-dir: one folder per model (default: visualization)")
    parser.add_argument("--gif", help="make_gif.py's GIF (default: the first of <gan-dir>/progress.gif and "
                                      "<vis-dir>/progress.gif that exists)")
    parser.add_argument("--out-dir", default="report", help="where report.md, report.pdf and the images go "
                                                            "(default: report)")
    parser.add_argument("--grids", type=int, default=6,
                        help="generator grids to show, evenly spread from the first epoch to the last (default: 6)")
    return parser.parse_args(argv)


def report(args):
    check_range(args, "grids", 2)
    output_folder(args.out_dir, "--out-dir")
    found = gather(args)
    doc = Document()
    write_summary(doc, found, args)
    write_curves(doc, found)
    write_health(doc, found)
    write_generator(doc, found)
    write_quality(doc, found)
    write_perturbation(doc, found)
    write_max_class(doc, found)
    write_max_features(doc, found)
    doc.write(args.out_dir)
    for line in gap_lines(found):
        print(line)
    print(f"wrote {os.path.join(args.out_dir, 'report.md')} and {os.path.join(args.out_dir, 'report.pdf')} "
          f"({doc.pages} page{'s' if doc.pages != 1 else ''})")


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda: report(args))


if __name__ == "__main__":
    main()
