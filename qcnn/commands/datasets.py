"""``qcnn datasets``: the known datasets, where each was found (or how to get it), counts and sizes."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from qcnn.commands.common import positive_int

    p = sub.add_parser("datasets", help="list the datasets, where they were found and how to get missing ones",
                       description="List the known datasets. For each: where its files were found (--data-dir, "
                                   "$QCNN_DATA, /usr/share/datasets/<name>, the cache), image counts and size on "
                                   "disk; for a missing one, every place looked in and how to get it.")
    p.add_argument("--dataset", default=None, help="only this dataset")
    p.add_argument("--data-dir", default=None,
                   help="look only here: a dataset folder or archive, or a root holding <name>/")
    p.add_argument("--download", action="store_true",
                   help="download the missing datasets that can be downloaded (MNIST, Fashion-MNIST, CIFAR-10)")
    p.add_argument("--bench", action="store_true",
                   help="also load each found dataset twice (load times; set QCNN_CACHE to an empty folder to time "
                        "a cold decode) and time one epoch of the augmented training loader (images/s)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size of --bench (default 128)")
    p.add_argument("--device", default="cpu", help="device of --bench (default cpu)")
    p.add_argument("--json", action="store_true", help="end with one JSON line: a list of one object per dataset")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def bench(name: str, data_dir, batch_size: int, device: str) -> dict:
    """Load ``name`` twice from disk (the second load reads the decoded cache) and time one augmented
    training epoch."""
    import time

    import torch

    from qcnn.data import clear_memory_cache, get_data

    times, cpu_times = [], []
    for _ in range(2):
        clear_memory_cache()  # time the files / the decoded cache, not the in-process copy
        t0, c0 = time.perf_counter(), time.process_time()
        bundle = get_data(name, data_dir, batch_size=batch_size, device=device, download=False)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for x, _ in bundle.train:
        n += len(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"first_load_s": round(times[0], 3), "second_load_s": round(times[1], 3),
            "first_load_cpu_s": round(cpu_times[0], 3), "second_load_cpu_s": round(cpu_times[1], 3),
            "train_images": n, "train_images_per_s": round(n / wall),
            "train_images_per_cpu_s": round(n / max(cpu, 1e-9)),
            "device": str(bundle.device), "threads": torch.get_num_threads()}


def run(args) -> int:
    import json

    from qcnn.data import describe, get_spec, list_datasets

    if args.data_dir is not None and not Path(args.data_dir).exists():
        raise ValueError(f"--data-dir {args.data_dir}: no such file or directory")
    names = [get_spec(args.dataset).name] if args.dataset else list_datasets()
    infos = [describe(n, args.data_dir, download=args.download) for n in names]
    for info in infos:
        shape = f"{info['channels']}x{info['image_size']}x{info['image_size']}"
        classes = info["classes"] if info["classes"] is not None else "?"
        head = f"{info['name']:14s} {classes} classes, {shape}, {info['storage']}"
        if not info["found"]:
            print(f"{head}\n  NOT FOUND; looked in:")
            for t in info["looked_in"]:
                print(f"    {t}")
            print("  get it with one of:\n" + "\n".join("  " + line for line in info["how_to_get"].splitlines()))
            continue
        counts = f"{info['train'] if info['train'] is not None else '?'} train / " \
                 f"{info['test'] if info['test'] is not None else '?'} test"
        print(f"{head}\n  {info['path']} ({info['format']}, from {info['origin']}): {counts}, {_size(info['bytes'])}")
        if "decoded_cache" in info:
            print(f"  decoded cache: {info['decoded_cache'] or 'none yet (built on first load)'}")
        if args.bench:
            info["bench"] = bench(info["name"], args.data_dir, args.batch_size, args.device)
            b = info["bench"]
            print(f"  bench: first load {b['first_load_s']:.2f} s ({b['first_load_cpu_s']:.2f} CPU-s), second load "
                  f"{b['second_load_s']:.2f} s ({b['second_load_cpu_s']:.2f} CPU-s), "
                  f"augmented train loader {b['train_images_per_s']:.0f} images/s "
                  f"({b['train_images_per_cpu_s']:.0f} per CPU-second; {b['device']}, "
                  f"batch {args.batch_size}, {b['threads']} threads)")
    if args.json:
        print(json.dumps(infos))
    if args.dataset and not infos[0]["found"]:
        return 1  # the one dataset asked for is not there (the listing above says where it was looked for)
    return 0
