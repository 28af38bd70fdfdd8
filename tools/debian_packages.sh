# Sourced by tools that need packages of a newer Debian than this Debian 12 machine's, without installing them
# (tools/cuda12_toolkit.sh, tools/gpu_vulkan_bench.sh --prepare):
#   debian_unpack DIR "SUITE COMPONENTS..." PACKAGE...
# downloads PACKAGE... of SUITE (e.g. "trixie main non-free") from the machine's own Debian mirror, with apt's lists
# and cache in DIR (apt's system state is left alone), into DIR/debs, and unpacks each into DIR/root.
debian_unpack() {
    local dir=$1 suite=$2 mirror f
    shift 2
    local options=(-oDir::Etc::SourceList="$dir/sources.list" -oDir::Etc::SourceParts=/nonexistent
                   -oDir::State::Lists="$dir/lists" -oDir::Cache="$dir/cache")
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
    # the machine's own Debian mirror: the first URIs of its deb822 sources, else of sources.list
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
    echo "deb $mirror $suite" > "$dir/sources.list"
    apt-get "${options[@]}" update -qq
    (cd "$dir/debs" && apt-get "${options[@]}" download "$@" 2> /dev/null)
    for f in "$dir"/debs/*.deb; do dpkg -x "$f" "$dir/root"; done
}
