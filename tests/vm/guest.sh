# Runs inside pmlmd's test VM (tests/vm/vm.py boots it; the image's init runs this with sh, as root,
# in the root cgroup): pytest over the guest tests, output on the serial console. The exit status is
# pytest's; the init hands it to the host in /mnt/out/rc. Kept in the repository, not the image, so
# a change here needs no image rebuild.
#
# /mnt/src is the repository, read-only; /mnt/out is the host's output directory, writable.
# /mnt/out/pytest-args holds pytest's arguments, one a line (the host always names the tests).

cd /mnt/src || exit 1
set --
if [ -f /mnt/out/pytest-args ]; then
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < /mnt/out/pytest-args
fi
[ $# -gt 0 ] || set -- tests/vm/guest

echo "vm: kernel $(uname -r), $(nproc) CPUs," \
    "cgroup root subtree_control: '$(cat /sys/fs/cgroup/cgroup.subtree_control)'"
echo "vm: pytest start at uptime $(cut -d' ' -f1 /proc/uptime)s"
# -c /dev/null, --rootdir: none of the repository's pytest settings (pyproject.toml) apply here.
# --confcutdir: only tests/vm/guest's conftest files load, not the host tiers' (tests/conftest.py).
# -p no:cacheprovider: /mnt/src is read-only. PYTHONDONTWRITEBYTECODE: the same for .pyc files
# (the host's own, where they are fresh, are still used); hypothesis keeps its examples in /tmp.
PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
    python3 -m pytest -c /dev/null --rootdir=/mnt/src --confcutdir=/mnt/src/tests/vm/guest \
    -p no:cacheprovider --color=no -ra "$@"
rc=$?
echo "vm: pytest end at uptime $(cut -d' ' -f1 /proc/uptime)s, exit status $rc"
exit $rc
