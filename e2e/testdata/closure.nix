# Fixture for the e2e suite: app-0.1 -> leaf-1.0, no nixpkgs.
# `nonce` makes every test's paths unique; `bigSize` adds an incompressible
# file of that many bytes to app (0 = none) for tests where size matters.
{ nonce, bigSize ? 0 }:
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  leaf = mk "leaf-1.0" "echo 'leaf ${nonce}' > $out";
in
mk "app-0.1" ''
  set -e
  mkdir -p $out/bin $out/share
  echo ${leaf} > $out/bin/dep
  echo '${nonce}' > $out/share/nonce
  printf '#!/bin/sh\necho hello from app\n' > $out/bin/app
  chmod +x $out/bin/app
  ln -s dep $out/bin/link
  if [ ${toString bigSize} -gt 0 ]; then
    head -c ${toString bigSize} /dev/urandom > $out/share/big
  fi
''
