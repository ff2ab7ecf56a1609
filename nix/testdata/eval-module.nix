# Evaluates ../module.nix without nixpkgs: a stub `lib` with the handful of
# functions the module uses, with the module system's merge semantics
# flattened (mkIf applies at once, mkMerge merges, mkDefault is the value),
# and stub packages. The Go test (module_test.go) checks the result.
let
  stubLib = rec {
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { type = "bool"; default = false; description = "Whether to enable ${name}."; };
    mkPackageOption = pkgs: name: _: mkOption { type = "package"; default = pkgs.${name}; defaultText = "pkgs.${name}"; };
    types = {
      str = "str";
      bool = "bool";
      path = "path";
      nullOr = t: "null or ${t}";
      submodule = m: { submodule = m; };
    };
    mkIf = cond: content: if cond then content else { };
    mkDefault = v: v;
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    recursiveUpdate = a: b:
      a // builtins.mapAttrs (n: v: if builtins.isAttrs v && builtins.isAttrs (a.${n} or null) then recursiveUpdate a.${n} v else v) b;
    mkMerge = builtins.foldl' recursiveUpdate { };
    optional = cond: x: if cond then [ x ] else [ ];
    escapeShellArg = a: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString a) + "'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
    getExe = p: "${p}/bin/${p.meta.mainProgram}";
    toInt = s: builtins.fromJSON s;
    last = l: builtins.elemAt l (builtins.length l - 1);
    splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
  };

  stubPkgs = {
    cacheproxy = { outPath = "/nix/store/00000000000000000000000000000000-cacheproxy"; meta.mainProgram = "cacheproxy"; };
    coreutils = { outPath = "/nix/store/00000000000000000000000000000000-coreutils"; };
    formats.toml = _: {
      type = "toml value";
      generate = name: value: { outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit value; };
    };
  };

  eval = cfg: import ../module.nix {
    lib = stubLib;
    pkgs = stubPkgs;
    config.services.cacheproxy = cfg;
  };

  settings = {
    listen = "[::]:5480";
    state_dir = "/var/lib/cacheproxy";
    policy.quorum = 1;
    admin.listen = "127.0.0.1:5481";
  };
  enabled = eval {
    enable = true;
    package = stubPkgs.cacheproxy;
    inherit settings;
    signingKeyFile = "/etc/cacheproxy/signing-key";
    adminTokenFile = "/etc/cacheproxy/admin-token";
    openFirewall = true;
  };
  noKeys = eval {
    enable = true;
    package = stubPkgs.cacheproxy;
    inherit settings;
    signingKeyFile = null;
    adminTokenFile = null;
    openFirewall = false;
  };
  inStore = eval {
    enable = true;
    package = stubPkgs.cacheproxy;
    inherit settings;
    signingKeyFile = "/nix/store/00000000000000000000000000000000-signing-key";
    adminTokenFile = null;
    openFirewall = false;
  };
  disabled = eval {
    enable = false;
    package = stubPkgs.cacheproxy;
    inherit settings;
    signingKeyFile = null;
    adminTokenFile = null;
    openFirewall = false;
  };
in
{
  options = builtins.attrNames enabled.options.services.cacheproxy;
  settingsOptions = builtins.attrNames enabled.options.services.cacheproxy.settings.type.submodule.options;
  enabled = enabled.config // {
    environment = enabled.config.environment // {
      etc."cacheproxy/cacheproxy.toml".source = enabled.config.environment.etc."cacheproxy/cacheproxy.toml".source.outPath;
      systemPackages = map toString enabled.config.environment.systemPackages;
    };
    systemd.services.cacheproxy = enabled.config.systemd.services.cacheproxy // {
      reloadTriggers = map (f: f.outPath) enabled.config.systemd.services.cacheproxy.reloadTriggers;
    };
  };
  noKeys = {
    inherit (noKeys.config.systemd.services.cacheproxy.serviceConfig) ExecStart LoadCredential;
    settings = noKeys.config.services.cacheproxy.settings;
    firewall = noKeys.config.networking.firewall.allowedTCPPorts;
  };
  disabled = disabled.config;
  assertions = map (a: a.assertion) (enabled.config.assertions ++ inStore.config.assertions);
}
