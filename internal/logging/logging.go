package logging

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/term"
)

// Output formats accepted in Options.Format.
const (
	FormatAuto    = "auto"
	FormatConsole = "console"
	FormatJSON    = "json"
	FormatJournal = "journal"
)

// ErrInvalid is wrapped by every error about bad Options.
var ErrInvalid = errors.New("logging: invalid options")

// Options selects the level and output format of the logger.
type Options struct {
	// Level is a zap level name: debug, info (the default when empty), warn,
	// error, dpanic, panic, fatal.
	Level string
	// Format is auto (the default when empty), console, json or journal.
	Format string
}

// environment is what the format decision depends on; tests replace it.
type environment struct {
	stderrIsJournal func() (bool, error)
	stderrIsTTY     func() bool
	journalEnabled  func() bool
}

func realEnvironment() environment {
	return environment{
		stderrIsJournal: journal.StderrIsJournalStream,
		stderrIsTTY:     func() bool { return term.IsTerminal(int(os.Stderr.Fd())) },
		journalEnabled:  journal.Enabled,
	}
}

// New builds the logger described by opts. The returned AtomicLevel changes the
// level of the running logger (for a configuration reload).
func New(opts Options) (*zap.Logger, zap.AtomicLevel, error) {
	level := zap.NewAtomicLevel() // info
	if opts.Level != "" {
		l, err := zapcore.ParseLevel(opts.Level)
		if err != nil {
			return nil, level, fmt.Errorf("%w: level %q (want debug, info, warn, error, dpanic, panic or fatal)", ErrInvalid, opts.Level)
		}
		level.SetLevel(l)
	}
	format, err := resolveFormat(opts.Format, realEnvironment())
	if err != nil {
		return nil, level, err
	}
	stderr := zapcore.Lock(os.Stderr)
	var core zapcore.Core
	switch format {
	case FormatJournal:
		core = NewJournalCore(level, identifier(), zapcore.NewCore(zapcore.NewJSONEncoder(jsonEncoderConfig()), stderr, level))
	case FormatConsole:
		core = zapcore.NewCore(zapcore.NewConsoleEncoder(consoleEncoderConfig()), stderr, level)
	default:
		core = zapcore.NewCore(zapcore.NewJSONEncoder(jsonEncoderConfig()), stderr, level)
	}
	log := zap.New(core,
		zap.AddCaller(),
		zap.AddStacktrace(zapcore.DPanicLevel),
		zap.ErrorOutput(stderr),
	)
	return log, level, nil
}

// resolveFormat turns the configured format into a concrete one.
func resolveFormat(format string, env environment) (string, error) {
	switch format {
	case "", FormatAuto:
		// systemd.exec(5): JOURNAL_STREAM names the device and inode of the
		// stream stderr was connected to; a match means our stderr is the
		// journal and the native protocol keeps the fields structured. A
		// malformed value is treated as "not the journal".
		if ok, err := env.stderrIsJournal(); err == nil && ok && env.journalEnabled() {
			return FormatJournal, nil
		}
		if env.stderrIsTTY() {
			return FormatConsole, nil
		}
		return FormatJSON, nil
	case FormatConsole, FormatJSON:
		return format, nil
	case FormatJournal:
		if !env.journalEnabled() {
			return "", fmt.Errorf("%w: format journal: the journald socket is not reachable", ErrInvalid)
		}
		return format, nil
	default:
		return "", fmt.Errorf("%w: format %q (want auto, console, json or journal)", ErrInvalid, format)
	}
}

// identifier is the SYSLOG_IDENTIFIER of journal entries: the program name,
// as journald would derive it for stream output.
func identifier() string {
	if len(os.Args) == 0 {
		return "gwagent"
	}
	return strings.TrimSuffix(filepath.Base(os.Args[0]), ".test")
}

func jsonEncoderConfig() zapcore.EncoderConfig {
	c := zap.NewProductionEncoderConfig()
	c.EncodeTime = zapcore.ISO8601TimeEncoder
	c.EncodeDuration = zapcore.StringDurationEncoder
	return c
}

func consoleEncoderConfig() zapcore.EncoderConfig {
	c := zap.NewDevelopmentEncoderConfig()
	c.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
	c.EncodeLevel = zapcore.CapitalColorLevelEncoder
	c.EncodeDuration = zapcore.StringDurationEncoder
	return c
}
