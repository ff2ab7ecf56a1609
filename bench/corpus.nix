# bench/corpus.nix — the fleet benchmark's corpus: a closure of real store
# paths built by Nix from files already on the machine (no nixpkgs, no
# network). Built by bench/fleet.sh; see bench/README.md.
#
# - `nSmall` small paths ("pkg-<i>"), each a copy of real files from
#   /usr/share and /usr/lib (text, man pages, shared objects), from about
#   `smallKiB` KiB up to 64x that, each referencing one or two earlier ones;
# - one big path per entry of `bigMiB` ("blob-<j>"), `randPct` percent random
#   bytes (incompressible) and the rest real binaries from /usr/lib, so xz and
#   zstd have real work and the compressed caches stay big; each references
#   a few small paths;
# - "fleet-system", which references every other path: its closure is the
#   whole corpus.
#
# `list` is a file of candidate host files ("SIZE PATH" a line, made by
# fleet.sh); it is read at build time (builds are unsandboxed here), not
# copied into the store. `tag` makes the store paths unique to one corpus.
{ list, tag, nSmall ? 125, smallKiB ? 32, bigMiB ? [ 50 65 80 100 120 ], randPct ? 30 }:
let
  mk = name: refs: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    LIST = list;
    TAG = tag;
    # Written into the output, so Nix records them as references.
    REFS = builtins.concatStringsSep " " (map toString refs);
    args = [ "-c" ''
      set -eu
      mkdir -p $out/nix-support
      echo "$TAG $REFS" > $out/nix-support/propagated-refs
      # fill DIR BUDGET_BYTES START MIN_SIZE: copy host files (keeping
      # their paths) from line START of $LIST on, skipping files smaller
      # than MIN_SIZE, until BUDGET bytes are copied. One awk and two tars
      # per path: a fork per file made a big path take minutes.
      fill() {
        mkdir -p "$1"
        tail -n +"$3" "$LIST" |
          awk -v b="$2" -v m="$4" '$1 >= m { n += $1; print substr($0, index($0, " ") + 1); if (n >= b) exit }' >"$1.files"
        tar -cf - --files-from="$1.files" --ignore-failed-read 2>/dev/null | tar -xf - -C "$1" || true
        rm -f "$1.files"
      }
      ${script}
    '' ];
  };
  small = builtins.genList (i:
    let
      kib = smallKiB * (1 + (i * 37) - ((i * 37) / 64) * 64);
      refs = if i == 0 then [ ] else
        [ (builtins.elemAt small (i - 1)) ] ++ (if i >= 4 then [ (builtins.elemAt small (i / 2)) ] else [ ]);
    in mk "pkg-${toString i}" refs ''
      fill $out/share ${toString (kib * 1024)} ${toString (1 + i * 53)} 0
      echo "pkg ${toString i}" > $out/share/README
    '') nSmall;
  big = builtins.genList (j:
    let
      mib = builtins.elemAt bigMiB j;
      rnd = mib * randPct / 100;
      refs = map (k: builtins.elemAt small (k - (k / nSmall) * nSmall)) [ (j * 3) (j * 3 + 1) (j * 7 + 2) ];
    in mk "blob-${toString j}" refs ''
      mkdir -p $out/lib $out/data
      head -c ${toString rnd}M /dev/urandom > $out/data/random.bin
      fill $out/lib ${toString ((mib - rnd) * 1024 * 1024)} ${toString (1 + j * 997)} 262144
    '') (builtins.length bigMiB);
in mk "fleet-system" (small ++ big) ''
  echo "fleet system" > $out/README
''
