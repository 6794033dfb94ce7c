package installer

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/abpart"
	"github.com/gwagent/gwagent/firmware/bootenv"
	"github.com/gwagent/gwagent/firmware/simulated"
)

// Deps are what every backend may use.
type Deps struct {
	// StateDir is the agent's state directory; a backend keeps its own
	// files in a subdirectory named after it unless configured otherwise.
	StateDir string
	Log      *zap.Logger
}

// Built is a constructed backend.
type Built struct {
	Installer firmware.Installer
	// Rebooter restarts the device for the "reboot" method: the backend's
	// own, or a simulated one that only logs.
	Rebooter firmware.Rebooter
}

type backend struct {
	defaults map[string]any
	build    func(settings map[string]any, deps Deps) (Built, error)
	inspect  func(ctx context.Context, settings map[string]any, deps Deps) (View, error)
}

// backends is fixed at compile time: a backend is added by adding a row.
var backends = map[string]backend{
	"simulated": {
		defaults: map[string]any{
			"waitBeforeDownload": "15s",
			"download":           "15s",
			"apply":              "15s",
			"simulatedSize":      1 << 20,
			"failAt":             "",
			"failMessage":        "",
			"stateDir":           "",
			"initialVersion":     "1.0.0",
		},
		build:   buildSimulated,
		inspect: inspectSimulated,
	},
	"abpart": {
		defaults: map[string]any{
			"slotA":         "",
			"slotB":         "",
			"slotType":      abpart.SlotTypeBlock,
			"rootA":         "",
			"rootB":         "",
			"labelA":        abpart.DefaultLabelA,
			"labelB":        abpart.DefaultLabelB,
			"partlabelDir":  abpart.DefaultPartlabelDir,
			"runningSlot":   "",
			"cmdlinePath":   "/proc/cmdline",
			"bootIdPath":    "/proc/sys/kernel/random/boot_id",
			"stateDir":      "",
			"bootLimit":     0,
			"rebootCommand": "systemctl reboot",
			"bootenv": map[string]any{
				"backend": "uboot",
				"uboot":   map[string]any{"configFile": "/etc/fw_env.config", "printenvPath": "", "setenvPath": "", "scriptDir": ""},
				"grub":    map[string]any{"envFile": "/boot/grub/grubenv", "editenvPath": ""},
				"file":    map[string]any{"path": ""},
			},
		},
		build:   buildABPart,
		inspect: inspectABPart,
	},
}

// Names lists the backend names, sorted.
func Names() []string {
	names := make([]string, 0, len(backends))
	for n := range backends {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Specs describes the backends to config.Load.
func Specs() []config.Backend {
	out := make([]config.Backend, 0, len(backends))
	for _, n := range Names() {
		out = append(out, config.Backend{Name: n, Defaults: backends[n].defaults})
	}
	return out
}

// Build constructs the configured backend.
func Build(c config.Installer, deps Deps) (Built, error) {
	b, ok := backends[c.Type]
	if !ok {
		return Built{}, fmt.Errorf("%w: installer.type: unknown installer %q (known: %s)", config.ErrConfig, c.Type, strings.Join(Names(), ", "))
	}
	if deps.Log == nil {
		deps.Log = zap.NewNop()
	}
	return b.build(c.Settings, deps)
}

// View is what the configured backend tells about the device, read
// without changing it (gwagent status).
type View struct {
	// Version is the firmware version the backend says runs; "" when it
	// cannot tell.
	Version string
	// AB is the A/B slots and the bootloader variables (abpart only).
	AB *abpart.Status
}

// Inspect reads what the configured backend knows about the device. Unlike
// Build it creates and writes nothing (no folder, no record set aside, no
// bootloader variable), so it may run beside the agent. A configuration
// error wraps config.ErrConfig; any other error is state that could not be
// read.
func Inspect(ctx context.Context, c config.Installer, deps Deps) (View, error) {
	b, ok := backends[c.Type]
	if !ok {
		return View{}, fmt.Errorf("%w: installer.type: unknown installer %q (known: %s)", config.ErrConfig, c.Type, strings.Join(Names(), ", "))
	}
	if deps.Log == nil {
		deps.Log = zap.NewNop()
	}
	return b.inspect(ctx, c.Settings, deps)
}

// decode fills out from settings, refusing unknown keys; errors name the
// key under installer.<name>.
func decode(name string, settings map[string]any, out any) error {
	dec, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
		Result:           out,
		ErrorUnused:      true,
		WeaklyTypedInput: true,
		Squash:           true,
		DecodeHook:       durationHook,
	})
	if err != nil {
		return err
	}
	if err := dec.Decode(settings); err != nil {
		return fmt.Errorf("%w: %s", config.ErrConfig, decodeMessage("installer."+name, err))
	}
	return nil
}

var fieldError = regexp.MustCompile(`^'([^']*)' (.*)$`)

// decodeMessage rewrites mapstructure's "'field' problem" lines as
// "installer.<name>.field: problem".
func decodeMessage(prefix string, err error) string {
	var out []string
	for _, line := range strings.Split(err.Error(), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "decoding failed") {
			continue
		}
		m := fieldError.FindStringSubmatch(line)
		switch {
		case m == nil:
			out = append(out, prefix+": "+line)
		case strings.HasPrefix(m[2], "has invalid keys: "):
			key := prefix
			if m[1] != "" {
				key += "." + m[1]
			}
			out = append(out, key+": unknown key "+strings.TrimPrefix(m[2], "has invalid keys: "))
		default:
			out = append(out, prefix+"."+m[1]+": "+m[2])
		}
	}
	return strings.Join(out, "; ")
}

// durationHook reads durations the way the rest of the configuration does
// (a unit is required).
func durationHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(time.Duration(0)) {
		return data, nil
	}
	return config.ParseDuration(data)
}

func buildSimulated(settings map[string]any, deps Deps) (Built, error) {
	var cfg simulated.Config
	if err := decode("simulated", settings, &cfg); err != nil {
		return Built{}, err
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(deps.StateDir, "simulated")
	}
	log := deps.Log.Named("simulated")
	inst, err := simulated.New(cfg, log)
	if err != nil {
		return Built{}, fmt.Errorf("%w: installer.simulated: %w", config.ErrConfig, err)
	}
	return Built{Installer: inst, Rebooter: simulated.NewRebooter(log)}, nil
}

func inspectSimulated(_ context.Context, settings map[string]any, deps Deps) (View, error) {
	var cfg simulated.Config
	if err := decode("simulated", settings, &cfg); err != nil {
		return View{}, err
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(deps.StateDir, "simulated")
	}
	v, err := simulated.ReadVersion(cfg)
	return View{Version: v}, err
}

type abpartSettings struct {
	abpart.Config `mapstructure:",squash"`
	Bootenv       bootenv.Config `mapstructure:"bootenv"`
	RebootCommand string         `mapstructure:"rebootCommand"`
}

// openABPart decodes the abpart settings and opens the bootloader
// environment (which touches nothing until it is read or written).
func openABPart(settings map[string]any, deps Deps) (abpartSettings, bootenv.Env, error) {
	var s abpartSettings
	if err := decode("abpart", settings, &s); err != nil {
		return s, nil, err
	}
	if s.StateDir == "" {
		s.StateDir = filepath.Join(deps.StateDir, "abpart")
	}
	env, err := bootenv.Open(s.Bootenv, nil, deps.Log.Named("abpart"))
	if err != nil {
		return s, nil, fmt.Errorf("%w: installer.abpart.bootenv: %w", config.ErrConfig, err)
	}
	return s, env, nil
}

func inspectABPart(ctx context.Context, settings map[string]any, deps Deps) (View, error) {
	s, env, err := openABPart(settings, deps)
	if err != nil {
		return View{}, err
	}
	st, err := abpart.Inspect(ctx, s.Config, env)
	if err != nil {
		return View{}, err
	}
	return View{AB: &st}, nil
}

func buildABPart(settings map[string]any, deps Deps) (Built, error) {
	s, env, err := openABPart(settings, deps)
	if err != nil {
		return Built{}, err
	}
	log := deps.Log.Named("abpart")
	cmd := strings.Fields(s.RebootCommand)
	if len(cmd) == 0 {
		return Built{}, fmt.Errorf("%w: installer.abpart.rebootCommand: must not be empty", config.ErrConfig)
	}
	reb := abpart.CommandRebooter{Command: cmd}
	inst, err := abpart.New(s.Config, abpart.Deps{Env: env, Rebooter: reb, Log: log})
	if err != nil {
		return Built{}, fmt.Errorf("%w: installer.abpart: %w", config.ErrConfig, err)
	}
	return Built{Installer: inst, Rebooter: inst}, nil
}
