package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// Where the configuration is looked for when no -c is given.
const (
	// ConfigEnvVar names a config file for every command, like -c.
	ConfigEnvVar = "CACHEPROXY_CONFIG"
	// SystemConfigPath is used when it exists and neither -c nor
	// $CACHEPROXY_CONFIG is given.
	SystemConfigPath = "/etc/cacheproxy/cacheproxy.toml"
)

// How a Location was found.
const (
	FromFlag     = "-c"
	FromEnv      = "$" + ConfigEnvVar
	FromSystem   = "default path"
	FromDefaults = "embedded defaults"
)

// Location is the configuration a command uses: a file, or the embedded
// defaults (Path ""). Every command finds it the same way (Locate), so that
// an admin command talks to the server that serve started from the same
// place, and messages can say which file they mean.
type Location struct {
	Path string
	From string // FromFlag, FromEnv, FromSystem or FromDefaults
}

// String names the configuration in messages: "config FILE (from -c)" or
// "embedded defaults".
func (l Location) String() string {
	if l.Path == "" {
		return FromDefaults
	}
	return fmt.Sprintf("config %s (from %s)", l.Path, l.From)
}

// Name is the file name, or "embedded defaults"; it prefixes problems.
func (l Location) Name() string {
	if l.Path == "" {
		return FromDefaults
	}
	return l.Path
}

// Locate finds the configuration: the -c flag (flag), else
// $CACHEPROXY_CONFIG, else env.SystemConfig if it exists, else the
// embedded defaults. A file named by -c or the variable must exist (Read
// says so); the system path is used only when present, but one that exists
// and cannot be looked at is an error rather than a silent fall back to the
// defaults, which would trust other upstreams than the operator wrote.
func Locate(flag string, env Env) (Location, error) {
	switch {
	case flag != "":
		return Location{Path: flag, From: FromFlag}, nil
	case env.ConfigFile != "":
		return Location{Path: env.ConfigFile, From: FromEnv}, nil
	case env.SystemConfig != "":
		_, err := os.Stat(env.SystemConfig)
		switch {
		case err == nil:
			return Location{Path: env.SystemConfig, From: FromSystem}, nil
		case !errors.Is(err, fs.ErrNotExist):
			return Location{}, fmt.Errorf("config %s: %w", env.SystemConfig, err)
		}
	}
	return Location{From: FromDefaults}, nil
}
