"""Kernel state <-> bundle: capture (save_state) and restore (load_state), one job per module.

capture.py    orchestration of a save: sort the namespace, group, pickle, files, history, manifest
sharing.py    which variables share objects (pickled together so identities hold)
pickling.py   objects -> chunked pickle streams (C pickler, dill for what it refuses)
reducers.py   per-type save/rebuild pairs (numpy, text columns, resources; register_reducer)
sources.py    notebook definitions no pickle can rebuild travel as their defining source
replay.py     re-create live resources by re-running their defining cell
files.py      working-directory files out and back in
history.py    In/Out out and back in
digest.py     content digests for values whose pickle bytes are not a function of their data
restore.py    orchestration of a load: verify everything, then apply
trust.py      what a pull back may load unasked (plain data, what this laptop sent)
preflight.py  %handoff --dry-run / %snapshot check: what would travel, without sending anything
reports.py    what a save or load did, per variable
"""
