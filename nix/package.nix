# cacheproxy, built with nixpkgs' buildGoModule.
#
#   pkgs.callPackage ./nix/package.nix { }
#
# go.mod asks for Go 1.26: on a nixpkgs whose default Go is older, pass a
# newer builder, e.g. `callPackage ./nix/package.nix { buildGoModule = pkgs.buildGo126Module; }`.
{
  lib,
  buildGoModule,
  pkg-config,
  xz,
}:

buildGoModule {
  pname = "cacheproxy";
  version = "0-unstable";

  # Only what the binary is built from: editing the README, the tests or
  # this directory does not rebuild it, and vendorHash covers exactly the
  # dependencies of these packages.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../go.mod
      ../go.sum
      ../cmd
      ../internal
    ];
  };

  # The NAR hash of `go mod vendor` run on the source above (computed with
  # Go 1.26 from go.sum: `go mod vendor && nix hash path vendor`). When
  # go.mod or go.sum change, set it to lib.fakeHash, build, and copy the
  # hash from the "got:" line of the error.
  vendorHash = "sha256-qpMlUuhsbIyDiXdPQtUCXKdN/KgQmAc1JKzgpn8Afvo=";

  subPackages = [ "cmd/cacheproxy" ];

  # xz NARs are decoded with liblzma (from xz, found with pkg-config), the
  # library Nix itself uses: about 1.5x the pure-Go decoder's speed, and its
  # dictionaries stay out of the Go heap (README, Performance). Without the
  # tag the binary is pure Go and needs neither.
  tags = [ "liblzma" ];
  env.CGO_ENABLED = 1;
  nativeBuildInputs = [ pkg-config ];
  buildInputs = [ xz ];
  ldflags = [
    "-s"
    "-w"
  ];

  # The unit tests need loopback networking and the e2e tests a Nix daemon;
  # run them from the source tree (./scripts/test), not in the sandbox.
  doCheck = false;

  meta = {
    description = "Verifying Nix binary-cache proxy: serves only paths approved by upstream signatures and independent rebuilder attestations";
    mainProgram = "cacheproxy";
    platforms = lib.platforms.linux;
  };
}
