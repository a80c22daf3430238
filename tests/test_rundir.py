"""Run directories and resume (issue 11): one run per directory, a resumed run keeps its settings
and its directory, a run that died before its first checkpoint leaves a reusable directory."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from spvit.config import ConfigError
from spvit.errors import CheckpointError
from spvit.rundir import RunLock
from spvit.search import main as search_main

from helpers import REPO, args, load, tool


def short_search(data, out, *extra):
    return args(data, out, '--target-ratio', '0.6', '--epochs', '2', '--seed', '2', *extra)


def steps(out):
    return [r['step'] for r in map(json.loads, open(out / 'log.jsonl'))]


@pytest.mark.slow
def test_resume_keeps_the_runs_settings(image_folder, tmp_path):
    out = tmp_path / 'run'
    search_main(short_search(image_folder, out, '--max-steps', '5', '--log-every', '1'))
    last = str(out / 'checkpoint-last.pth')
    before = (out / 'checkpoint-last.pth').read_bytes()
    # a setting that shapes the run and differs from it: one line, exit 2, nothing written
    r = tool('search.py', ['--resume', last, '--lr', '1', '--epochs', '5'])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--epochs 5 differs from the resumed run's 2 (and --lr)" in r.stderr
    r = tool('search.py', ['--resume', last, '--target-ratio', '0.3', '--max-steps', '6'])
    assert r.returncode == 2 and "--target-ratio 0.3 differs" in r.stderr, r.stderr
    assert (out / 'checkpoint-last.pth').read_bytes() == before
    # repeating the run's own settings is fine, and other workers are used but reported
    r = tool('search.py', ['--resume', last, '--target-ratio', '0.6', '--epochs', '2', '--workers', '1',
                           '--max-steps', '6'])
    assert r.returncode == 0, r.stderr
    assert "resume: --workers 1 instead of the run's 0" in r.stderr
    assert load(last)['global_step'] == 6 and load(last)['config']['workers'] == 1     # what ran last


def test_resume_trims_the_log_and_clears_temp_files(image_folder, tmp_path):
    out = tmp_path / 'run'
    search_main(short_search(image_folder, out, '--max-steps', '4', '--log-every', '1'))
    with open(out / 'log.jsonl', 'a') as f:       # steps a killed run logged after its last checkpoint
        f.write(json.dumps({'kind': 'step', 'epoch': 0, 'step': 5}) + '\n')
    (out / 'checkpoint-last.pth.tmp4242').write_bytes(b'half')
    (out / 'notes.tmp').write_text('the user\'s')
    search_main(['--resume', str(out / 'checkpoint-last.pth'), '--max-steps', '6'])
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert not (out / 'checkpoint-last.pth.tmp4242').exists() and (out / 'notes.tmp').exists()


@pytest.mark.slow
def test_resume_into_another_directory_never_overwrites_a_run(image_folder, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    search_main(short_search(image_folder, a, '--max-steps', '3'))
    search_main(short_search(image_folder, b, '--max-steps', '3'))
    b_state = (b / 'checkpoint-last.pth').read_bytes()
    with pytest.raises(ConfigError, match='already holds a run'):
        search_main(['--resume', str(a / 'checkpoint-last.pth'), '--output-dir', str(b)])
    assert (b / 'checkpoint-last.pth').read_bytes() == b_state
    a_state = (a / 'checkpoint-last.pth').read_bytes()
    search_main(['--resume', str(a / 'checkpoint-last.pth'), '--output-dir', str(tmp_path / 'c'), '--max-steps', '4'])
    assert load(tmp_path / 'c' / 'checkpoint-last.pth')['global_step'] == 4
    assert (a / 'checkpoint-last.pth').read_bytes() == a_state


def test_a_run_that_died_before_its_first_checkpoint_leaves_a_reusable_directory(image_folder, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'config.yaml').write_text('lr: 1.0\n')
    (out / 'log.jsonl').write_text(json.dumps({'kind': 'step', 'epoch': 0, 'step': 1}) + '\n')
    search_main(short_search(image_folder, out, '--max-steps', '2', '--log-every', '1'))
    assert steps(out) == [1, 2] and load(out / 'checkpoint-last.pth')['global_step'] == 2
    with pytest.raises(ConfigError, match=r'already holds a run \(checkpoint-last.pth'):
        search_main(short_search(image_folder, out, '--max-steps', '2'))


@pytest.mark.slow
def test_a_directory_in_use_by_another_run_is_refused(image_folder, tmp_path):
    """Another process holds the run directory's lock (a live run): a second run there exits 2
    before writing; the lock goes with its holder."""
    out = tmp_path / 'run'
    out.mkdir()
    lock = RunLock(str(out))
    lock.acquire()
    try:
        r = tool('search.py', short_search(image_folder, out, '--max-steps', '2'))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f'{out} is in use by another run (pid {os.getpid()})' in r.stderr
        assert not (out / 'config.yaml').exists()
    finally:
        lock.release()
    r = tool('search.py', short_search(image_folder, out, '--max-steps', '2'))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_nonfinite_loss_before_any_checkpoint_says_so(image_folder, tmp_path):
    r = tool('search.py', short_search(image_folder, tmp_path / 'run', '--lr', '1e30'))
    assert r.returncode == 1 and 'non-finite loss' in r.stderr, r.stderr[-500:]
    assert 'no state was saved yet' in r.stderr and not (tmp_path / 'run' / 'checkpoint-last.pth').exists()


def test_sigterm_to_the_process_group_saves_state(image_folder, tmp_path):
    """Slurm, systemd and ``kill -- -PGID`` signal the data workers too: the run still saves its
    state and exits 143; on a stderr that is not a terminal the progress is plain lines."""
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'tools', 'search.py'),
                             *short_search(image_folder, out, '--epochs', '100', '--log-every', '1', '--workers', '2')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': REPO}, start_new_session=True)
    deadline = time.time() + 120
    while not (out / 'log.jsonl').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-800:]
    assert load(out / 'checkpoint-last.pth')['global_step'] >= 1
    assert 'Traceback' not in err and 'exited unexpectedly' not in err
    assert '\r' not in err and re.search(r'^search 1/100: \d+/16 steps \(\d+%\), [\d.]+ s/step, loss=', err, re.M), err[-800:]


def test_a_resume_state_that_does_not_fit_names_its_keys(image_folder, tmp_path):
    out = tmp_path / 'run'
    search_main(short_search(image_folder, out, '--max-steps', '2'))
    state = load(out / 'checkpoint-last.pth')
    weights = state['supernet']['state_dict']
    weights['extra.weight'] = weights.pop('model.cls_token')
    torch.save(state, out / 'checkpoint-last.pth')
    with pytest.raises(CheckpointError, match=r'resume checkpoint does not fit the model: missing: model.cls_token '
                                              r'\(1\); unexpected: extra.weight \(1\)'):
        search_main(['--resume', str(out / 'checkpoint-last.pth')])
