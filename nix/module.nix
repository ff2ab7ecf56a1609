# NixOS module: services.cacheproxy.
#
#   imports = [ ./nix/module.nix ];
#   services.cacheproxy = {
#     enable = true;
#     package = pkgs.callPackage ./nix/package.nix { };
#     signingKeyFile = "/etc/cacheproxy/signing-key";
#     adminTokenFile = "/etc/cacheproxy/admin-token";
#     openFirewall = true;
#     settings = {
#       listen = "[::]:5480";
#       policy.attesters = [ "rebuilder-a-1:..." ];
#     };
#   };
#
# The configuration is written to /etc/cacheproxy/cacheproxy.toml, where
# admin commands run on the host find it; a change to `settings` reloads
# the running service (SIGHUP) instead of restarting it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.cacheproxy;
  format = pkgs.formats.toml { };
  configFile = format.generate "cacheproxy.toml" cfg.settings;
  configPath = "/etc/cacheproxy/cacheproxy.toml";

  # "host:port" and "[v6]:port": the port is after the last colon.
  listenPort = addr: lib.toInt (lib.last (lib.splitString ":" addr));

  # toString: a path literal must name the file where it is, never be
  # copied into the world-readable store.
  credentials =
    lib.optional (cfg.signingKeyFile != null) "signing-key:${toString cfg.signingKeyFile}"
    ++ lib.optional (cfg.adminTokenFile != null) "admin-token:${toString cfg.adminTokenFile}";

  inStore = f: f != null && lib.hasPrefix builtins.storeDir (toString f);
in
{
  options.services.cacheproxy = {
    enable = lib.mkEnableOption "cacheproxy, a verifying Nix binary-cache proxy";

    package = lib.mkPackageOption pkgs "cacheproxy" { };

    settings = lib.mkOption {
      description = ''
        cacheproxy configuration, written as TOML to ${configPath}; see the
        README's Configuration section for every key. Keys that select
        secrets (signing_key_file, admin.token_file) are better set through
        signingKeyFile and adminTokenFile, which hand them to the service
        through systemd's LoadCredential.
      '';
      default = { };
      type = lib.types.submodule {
        freeformType = format.type;
        options = {
          listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:5480";
            example = "[::]:5480";
            description = "Address of the binary-cache listener (host:port). openFirewall opens its port.";
          };
          state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/cacheproxy";
            description = ''
              State directory. The service's StateDirectory; set here too so
              that admin commands run on the host find the generated admin
              token when adminTokenFile is null.
            '';
          };
        };
      };
    };

    signingKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/etc/cacheproxy/signing-key";
      description = ''
        Gatekeeper secret key (`cacheproxy keygen NAME`, the NAME.sec file),
        readable by root only; the service reads a copy through
        LoadCredential. Null: a key is generated in the state directory on
        first start (`cacheproxy pubkey` prints its public half).
      '';
    };

    adminTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/etc/cacheproxy/admin-token";
      description = ''
        Admin API bearer token (at least 16 bytes), readable by root only;
        the service reads a copy through LoadCredential, and admin commands
        run as root read this file. Null: a token is generated in the state
        directory.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the TCP port of settings.listen in the firewall (the admin port stays closed).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !inStore cfg.signingKeyFile && !inStore cfg.adminTokenFile;
        message = "services.cacheproxy: signingKeyFile and adminTokenFile must not be in the Nix store, which every user can read.";
      }
    ];

    # The source files, not the credential copies, are what an operator's
    # admin commands read; the service is pointed at the copies by flags.
    services.cacheproxy.settings = lib.mkMerge [
      (lib.mkIf (cfg.signingKeyFile != null) { signing_key_file = lib.mkDefault (toString cfg.signingKeyFile); })
      (lib.mkIf (cfg.adminTokenFile != null) { admin.token_file = lib.mkDefault (toString cfg.adminTokenFile); })
    ];

    environment.etc."cacheproxy/cacheproxy.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ (listenPort cfg.settings.listen) ];

    systemd.services.cacheproxy = {
      description = "cacheproxy, a verifying Nix binary-cache proxy";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # A new configuration is applied by ExecReload, not by a restart.
      reloadTriggers = [ configFile ];

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = lib.escapeShellArgs (
          [
            (lib.getExe cfg.package)
            "serve"
            "-c"
            configPath
          ]
          ++ lib.optional (cfg.signingKeyFile != null) "--signing-key-file=%d/signing-key"
          ++ lib.optional (cfg.adminTokenFile != null) "--admin-token-file=%d/admin-token"
        );
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        TimeoutStopSec = "45s";
        Restart = "on-failure";
        RestartSec = "2s";
        LimitNOFILE = 65536;

        StateDirectory = "cacheproxy";
        StateDirectoryMode = "0700";
        DynamicUser = true;
        UMask = "0077";
        LoadCredential = credentials;

        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateUsers = true;
        PrivateMounts = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
        # The Go runtime raises its file limit with setrlimit at start:
        # EPERM (ignored) rather than SIGSYS.
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
