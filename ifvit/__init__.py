"""Project-wide plumbing that every stage shares: errors and the CLI convention, atomic writes, folder locks.

Why a package of its own: `pipeline` -> `train` -> `evaluate` may only import forwards, and `train` takes
nothing from `pipeline` but its reader, yet all three write files that must appear whole, guard their output
folders and report mistakes the same way. So this package sits below all of them, and it imports nothing
but the standard library: Ray workers, the bare GPU machine (torch only) and the tests import it alike.

    ifvit.errors   UserError (exit 2: the message says what to do), JobFailed (exit 1: it ran and failed)
    ifvit.cli      ArgumentParser (one-line usage errors) and the @entry_point wrapper of every main()
    ifvit.files    atomic_write_bytes / _text / _json, atomic_path (for libraries that write to a path), cache_dir
    ifvit.lock     FolderLock: one job per output folder (shard set, run directory, eval folder)
"""
