"""Kernel state <-> bundle: capture (save_state) and restore (load_state), one job per module.

capture.py   orchestration of a save: sort the namespace, group, pickle, files, history, manifest
sharing.py   which variables share objects (pickled together so identities hold)
pickling.py  objects -> chunked pickle streams (C pickler, dill for what it refuses)
reducers.py  per-type save/rebuild pairs (numpy views, text columns, datetimes)
replay.py    re-create live resources by re-running their defining cell
files.py     working-directory files out and back in
history.py   In/Out out and back in
restore.py   orchestration of a load: verify everything, then apply
reports.py   what a save or load did, per variable
"""
