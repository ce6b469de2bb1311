"""The stage on another architecture, and image/run-stage against pi-gen's conventions."""
from __future__ import annotations

import subprocess
from pathlib import Path

from guest import run

UNITS = ["/usr/lib/systemd/system/himbeerecouch.service", "/usr/lib/systemd/system/himbeerecouch-firstboot.service"]
ROOT = Path(__file__).resolve().parents[2]


def chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(root), *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}, timeout=600)


def test_stage_on_arm64_under_binfmt(sd_image):
    """The same stage, applied to the SD card image's arm64 root (qemu-user through binfmt)."""
    rootfs = Path(sd_image["ROOTFS"])
    assert chroot(rootfs, "dpkg", "--print-architecture").stdout.strip() == "arm64"
    status = chroot(rootfs, "dpkg-query", "-W", "-f", "${Status} ${Version}", "himbeerecouch").stdout
    assert status.startswith("install ok installed "), status
    # It exits 0 even on parse errors: its output is the verdict.
    verify = chroot(rootfs, "systemd-analyze", "verify", "--man=no", *UNITS)
    assert verify.returncode == 0 and verify.stdout.strip() == "", verify.stdout
    enabled = chroot(rootfs, "systemctl", "is-enabled", "himbeerecouch.service", "himbeerecouch-firstboot.service")
    assert enabled.stdout.split()[-2:] == ["enabled", "enabled"], enabled.stdout
    state = rootfs / "var" / "rspby"
    assert state.is_dir() and not any(state.iterdir())
    assert (rootfs / "boot" / "firmware" / "himbeerecouch.txt").is_file()


def test_run_stage_follows_pi_gen_conventions(image, tmp_path):
    """image/run-stage on a small stage that uses every convention, on a copy of the test
    image's stand-in root: the order of steps, SKIP, non-executable NN-run.sh, debconf with
    variables, packages files with comments, quilt patches, EXPORT_IMAGE, pi-gen's variables."""
    base = Path(image["ROOTFS"]).parents[1] / "stage2" / "rootfs"
    stage = tmp_path / "stage-probe"
    (stage / "00-first" / "00-patches").mkdir(parents=True)
    (stage / "01-skipped").mkdir()
    (stage / "01-skipped" / "SKIP").touch()
    (stage / "01-skipped" / "00-run-chroot.sh").write_text("echo skipped >> /probe.log\n")
    (stage / "02-second").mkdir()
    files = {
        "prerun.sh": '#!/bin/bash -e\n[ -d "${ROOTFS_DIR}" ] || copy_previous\necho "prerun $STAGE" >> "${ROOTFS_DIR}/probe.log"\n',
        "EXPORT_IMAGE": 'IMG_SUFFIX="-probe"\n',
        "00-first/00-debconf": "# a comment\nprobe\tprobe/question\tstring\t${PROBE_ANSWER}\n",
        "00-first/00-packages-nr": "# a comment\nhello   # another\n",
        "00-first/00-run.sh": '#!/bin/bash -e\necho "run.sh $(basename "$PWD") ${STAGE_WORK_DIR} ${ROOTFS_DIR}" >> "${ROOTFS_DIR}/probe.log"\n',
        "00-first/01-run.sh": 'echo "not executable" >> "${ROOTFS_DIR}/probe.log"\n',
        "00-first/01-run-chroot.sh": "debconf-show probe >> /probe.log\necho chroot >> /probe.log\n",
        "00-first/00-patches/series": "01-probe.diff\n",
        "00-first/00-patches/01-probe.diff": "--- a/rootfs/etc/hostname\n+++ b/rootfs/etc/hostname\n@@ -1 +1 @@\n-raspberrypi\n+probe\n",
        "02-second/00-run-chroot.sh": "echo second >> /probe.log\n",
    }
    for name, text in files.items():
        (stage / name).write_text(text)
    for name in ("prerun.sh", "00-first/00-run.sh"):
        (stage / name).chmod(0o755)
    work = tmp_path / "work"
    config = tmp_path / "config"
    config.write_text(f'export WORK_DIR="{work}"\nexport PREV_ROOTFS_DIR="{base}"\nexport PROBE_ANSWER="forty two"\n'
                      "export DEBIAN_FRONTEND=noninteractive\n")
    try:
        run([str(ROOT / "image" / "run-stage"), "-c", str(config), str(stage)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}, timeout=900)
        rootfs = work / "stage-probe" / "rootfs"
        lines = (rootfs / "probe.log").read_text().splitlines()
        assert lines[0] == "prerun stage-probe"
        assert lines[1] == f"run.sh 00-first {work}/stage-probe {rootfs}"
        assert "forty two" in lines[2]
        assert lines[3:] == ["chroot", "second"], lines
        assert (rootfs / "etc" / "hostname").read_text() == "probe\n"
        assert (rootfs / "usr" / "bin" / "hello").exists()
        assert (work / "exports").read_text() == f"{rootfs} -probe\n"
        mounts = Path("/proc/self/mounts").read_text()
        assert str(work) not in mounts
    finally:
        if str(work) not in Path("/proc/self/mounts").read_text():
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def stage_config(tmp_path: Path, base: Path, deb: Path, server: str) -> Path:
    config = tmp_path / "config"
    config.write_text(f'export WORK_DIR="{tmp_path / "work"}"\nexport PREV_ROOTFS_DIR="{base}"\n'
                      f'export HIMBEERECOUCH_DEB="{deb}"\nexport HIMBEERECOUCH_SERVER="{server}"\n'
                      "export DEBIAN_FRONTEND=noninteractive\n")
    return config


def run_stage(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "image" / "run-stage"), "-c", str(ROOT / "image" / "config"), "-c", str(config),
                           str(ROOT / "image" / "stage-himbeerecouch")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"})


def remove_work(work: Path) -> None:
    if str(work) not in Path("/proc/self/mounts").read_text():
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def test_preseeded_server_ends_up_in_the_boot_file(image, deb, tmp_path):
    """HIMBEERECOUCH_SERVER in pi-gen's config: preseeded through the package's debconf question
    (00-debconf, expanded in the chroot), it becomes the boot file's server line, and neither
    /var/rspby nor the debconf database keeps it."""
    from himbeerecouch.config import read_boot_file

    base = Path(image["ROOTFS"]).parents[1] / "stage2" / "rootfs"
    url = "https://couch.example.org:6984"
    try:
        result = run_stage(stage_config(tmp_path, base, deb, url))
        assert result.returncode == 0, result.stdout[-5000:]
        rootfs = tmp_path / "work" / "stage-himbeerecouch" / "rootfs"
        boot_file = rootfs / "boot" / "firmware" / "himbeerecouch.txt"
        assert read_boot_file(boot_file) == {"server": url}
        assert not any((rootfs / "var" / "rspby").iterdir())
        answer = chroot(rootfs, "debconf-show", "himbeerecouch").stdout
        assert url not in answer and "himbeerecouch/server:" in answer, answer
    finally:
        remove_work(tmp_path / "work")


def test_server_with_a_password_is_refused(image, deb, tmp_path):
    base = Path(image["ROOTFS"]).parents[1] / "stage2" / "rootfs"
    try:
        result = run_stage(stage_config(tmp_path, base, deb, "https://admin:secret@couch.example.org:6984"))
        assert result.returncode != 0
        assert "no image may hold a password" in result.stdout, result.stdout[-3000:]
    finally:
        remove_work(tmp_path / "work")
