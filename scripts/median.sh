# Sourced by the benchmark scripts.
# median_range LIST [FORMAT|mid]: of a newline-separated list of numbers, "median [lowest–highest]",
# each in the printf FORMAT (%d unless given), or the median alone with "mid".
median_range() {
  echo -n "$1" | sort -g | awk -v how="${2:-%d}" '{v[NR]=$1} END {
    m=v[int((NR+1)/2)]; if (how == "mid") print m; else printf how " [" how "–" how "]", m, v[1], v[NR] }'
}
