package hub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrQuery is wrapped by every query parse error.
var ErrQuery = errors.New("hub: invalid query")

// Query limits: IoT Hub refuses queries longer than 8 KB; the nesting bound
// keeps the recursive parser's stack small whatever the input.
const (
	maxQueryLength = 8192
	maxQueryDepth  = 32
)

// Query is a parsed device query: SELECT [TOP n] * FROM devices [WHERE …],
// or FROM devices.jobs for the per-device results of jobs (whose paths may
// be written devices.jobs.jobId or jobId).
// The WHERE clause supports comparisons (=, !=, <>, <, <=, >, >=) of a
// property path with a literal (string, number, true, false, null),
// is_defined(path), path IN [literals] and path NIN [literals], AND, OR,
// NOT and parentheses, as IoT Hub's query language does for these shapes.
type Query struct {
	Top   int  // 0: no TOP clause
	Jobs  bool // FROM devices.jobs
	Where Expr // nil: every device
}

// Expr is a WHERE condition.
type Expr interface {
	// Match reports whether the twin document (decoded with UseNumber)
	// satisfies the condition.
	Match(doc map[string]any) bool
	String() string
}

// Match reports whether a twin matches the query's WHERE clause.
func (q *Query) Match(doc map[string]any) bool {
	if q.Where == nil {
		return true
	}
	if q.Jobs {
		// devices.jobs.x and x name the same member of a job row.
		row := make(map[string]any, len(doc)+1)
		for k, v := range doc {
			row[k] = v
		}
		row["devices"] = map[string]any{"jobs": doc}
		doc = row
	}
	return q.Where.Match(doc)
}

// String formats the query canonically; parsing it again gives the same
// query.
func (q *Query) String() string {
	var b strings.Builder
	b.WriteString("SELECT ")
	if q.Top > 0 {
		b.WriteString("TOP " + strconv.Itoa(q.Top) + " ")
	}
	b.WriteString("* FROM devices")
	if q.Jobs {
		b.WriteString(".jobs")
	}
	if q.Where != nil {
		b.WriteString(" WHERE " + q.Where.String())
	}
	return b.String()
}

type andExpr struct{ l, r Expr }
type orExpr struct{ l, r Expr }
type notExpr struct{ e Expr }
type definedExpr struct{ path []string }

// inExpr is path IN [l1, l2, …] (or NIN: not in): IN matches when the value
// equals one of the literals, NIN when the value is defined and equals
// none.
type inExpr struct {
	path []string
	lits []literal
	not  bool
}
type cmpExpr struct {
	path []string
	op   string
	lit  literal
}

// literal is a constant of the query: string, number (kept as its text and
// its value), bool or null.
type literal struct {
	kind litKind
	s    string  // string value, or number text
	n    float64 // number value
	b    bool
}

type litKind int

const (
	litNull litKind = iota
	litString
	litNumber
	litBool
)

func (e andExpr) Match(d map[string]any) bool { return e.l.Match(d) && e.r.Match(d) }
func (e orExpr) Match(d map[string]any) bool  { return e.l.Match(d) || e.r.Match(d) }
func (e notExpr) Match(d map[string]any) bool { return !e.e.Match(d) }
func (e definedExpr) Match(d map[string]any) bool {
	_, ok := lookup(d, e.path)
	return ok
}

func (e inExpr) Match(d map[string]any) bool {
	v, ok := lookup(d, e.path)
	if !ok {
		return false
	}
	for _, l := range e.lits {
		if c, ok := compare(v, l); ok && c == 0 {
			return !e.not
		}
	}
	return e.not
}

func (e cmpExpr) Match(d map[string]any) bool {
	v, ok := lookup(d, e.path)
	if !ok {
		return false
	}
	c, ok := compare(v, e.lit)
	if !ok {
		return false // only primitives of the same type compare
	}
	switch e.op {
	case "=":
		return c == 0
	case "!=":
		return c != 0
	case "<":
		return c < 0
	case "<=":
		return c <= 0
	case ">":
		return c > 0
	case ">=":
		return c >= 0
	}
	return false
}

func (e andExpr) String() string     { return "(" + e.l.String() + " AND " + e.r.String() + ")" }
func (e orExpr) String() string      { return "(" + e.l.String() + " OR " + e.r.String() + ")" }
func (e notExpr) String() string     { return "NOT " + e.e.String() }
func (e definedExpr) String() string { return "is_defined(" + strings.Join(e.path, ".") + ")" }
func (e inExpr) String() string {
	op := " IN ["
	if e.not {
		op = " NIN ["
	}
	parts := make([]string, len(e.lits))
	for i, l := range e.lits {
		parts[i] = l.String()
	}
	return strings.Join(e.path, ".") + op + strings.Join(parts, ", ") + "]"
}

func (e cmpExpr) String() string {
	return strings.Join(e.path, ".") + " " + e.op + " " + e.lit.String()
}

func (l literal) String() string {
	switch l.kind {
	case litString:
		return "'" + strings.ReplaceAll(l.s, "'", "''") + "'"
	case litNumber:
		return l.s
	case litBool:
		return strconv.FormatBool(l.b)
	}
	return "null"
}

// lookup follows a property path through nested objects.
func lookup(doc map[string]any, path []string) (any, bool) {
	var cur any = doc
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[p]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// compare orders a document value against a literal; ok is false when they
// are not comparable.
func compare(v any, l literal) (int, bool) {
	switch v := v.(type) {
	case nil:
		return 0, l.kind == litNull
	case string:
		if l.kind != litString {
			return 0, false
		}
		return strings.Compare(v, l.s), true
	case bool:
		if l.kind != litBool {
			return 0, false
		}
		switch {
		case v == l.b:
			return 0, true
		case !v:
			return -1, true
		default:
			return 1, true
		}
	case json.Number:
		if l.kind != litNumber {
			return 0, false
		}
		f, err := v.Float64()
		if err != nil {
			return 0, false
		}
		switch {
		case f < l.n:
			return -1, true
		case f > l.n:
			return 1, true
		}
		return 0, true
	}
	return 0, false
}

// decodeAny decodes a JSON object keeping numbers as json.Number.
func decodeAny(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return m, nil
}

// ParseQuery parses a device query. Keywords are case-insensitive.
func ParseQuery(s string) (*Query, error) {
	if len(s) > maxQueryLength {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrQuery, maxQueryLength)
	}
	toks, err := lex(s)
	if err != nil {
		return nil, err
	}
	p := &parser{toks: toks}
	q, err := p.query()
	if err != nil {
		return nil, err
	}
	return q, nil
}

type tokKind int

const (
	tEOF tokKind = iota
	tIdent
	tString
	tNumber
	tOp
	tPunct // ( ) . * ,
)

type token struct {
	kind tokKind
	text string // identifier, operator, punctuation, number text, or decoded string
	pos  int
}

func isIdentStart(c byte) bool {
	return c == '_' || c == '$' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

func isIdentPart(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' }

func lex(s string) ([]token, error) {
	var toks []token
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case isIdentStart(c):
			j := i + 1
			for j < len(s) && isIdentPart(s[j]) {
				j++
			}
			toks = append(toks, token{tIdent, s[i:j], i})
			i = j
		case c >= '0' && c <= '9' || c == '-' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9':
			j := i + 1
			for j < len(s) && (s[j] >= '0' && s[j] <= '9' || s[j] == '.' || s[j] == 'e' || s[j] == 'E' ||
				(s[j] == '+' || s[j] == '-') && (s[j-1] == 'e' || s[j-1] == 'E')) {
				j++
			}
			text := s[i:j]
			if _, err := strconv.ParseFloat(text, 64); err != nil {
				return nil, fmt.Errorf("%w: bad number %q at %d", ErrQuery, text, i)
			}
			toks = append(toks, token{tNumber, text, i})
			i = j
		case c == '\'' || c == '"':
			var b strings.Builder
			j := i + 1
			for {
				if j >= len(s) {
					return nil, fmt.Errorf("%w: unterminated string at %d", ErrQuery, i)
				}
				if s[j] == c {
					if j+1 < len(s) && s[j+1] == c { // doubled quote
						b.WriteByte(c)
						j += 2
						continue
					}
					break
				}
				b.WriteByte(s[j])
				j++
			}
			toks = append(toks, token{tString, b.String(), i})
			i = j + 1
		case c == '=':
			toks = append(toks, token{tOp, "=", i})
			i++
		case c == '!' || c == '<' || c == '>':
			op := string(c)
			if i+1 < len(s) && (s[i+1] == '=' || c == '<' && s[i+1] == '>') {
				op += string(s[i+1])
			}
			if op == "!" {
				return nil, fmt.Errorf("%w: '!' at %d must be '!='", ErrQuery, i)
			}
			if op == "<>" {
				toks = append(toks, token{tOp, "!=", i})
			} else {
				toks = append(toks, token{tOp, op, i})
			}
			i += len(op)
		case c == '(' || c == ')' || c == '.' || c == '*' || c == ',' || c == '[' || c == ']':
			toks = append(toks, token{tPunct, string(c), i})
			i++
		default:
			return nil, fmt.Errorf("%w: unexpected %q at %d", ErrQuery, c, i)
		}
	}
	return append(toks, token{kind: tEOF, pos: len(s)}), nil
}

type parser struct {
	toks  []token
	i     int
	depth int
}

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token {
	t := p.toks[p.i]
	if t.kind != tEOF {
		p.i++
	}
	return t
}

func (p *parser) keyword(kw string) bool {
	t := p.peek()
	if t.kind == tIdent && strings.EqualFold(t.text, kw) {
		p.i++
		return true
	}
	return false
}

func (p *parser) expectKeyword(kw string) error {
	if !p.keyword(kw) {
		return p.errorf("expected %s", kw)
	}
	return nil
}

func (p *parser) punct(c string) bool {
	if t := p.peek(); t.kind == tPunct && t.text == c {
		p.i++
		return true
	}
	return false
}

func (p *parser) errorf(format string, args ...any) error {
	t := p.peek()
	where := "end of query"
	if t.kind != tEOF {
		where = fmt.Sprintf("%q at %d", t.text, t.pos)
	}
	return fmt.Errorf("%w: %s, found %s", ErrQuery, fmt.Sprintf(format, args...), where)
}

func (p *parser) query() (*Query, error) {
	q := &Query{}
	if err := p.expectKeyword("SELECT"); err != nil {
		return nil, err
	}
	if p.keyword("TOP") {
		t := p.next()
		n, err := strconv.Atoi(t.text)
		if t.kind != tNumber || err != nil || n < 1 {
			return nil, fmt.Errorf("%w: TOP needs a positive integer", ErrQuery)
		}
		q.Top = n
	}
	if !p.punct("*") {
		return nil, p.errorf("only SELECT * is supported")
	}
	if err := p.expectKeyword("FROM"); err != nil {
		return nil, err
	}
	if !p.keyword("devices") {
		return nil, p.errorf("only FROM devices is supported")
	}
	if p.punct(".") {
		if !p.keyword("jobs") {
			return nil, p.errorf("only FROM devices and FROM devices.jobs are supported")
		}
		q.Jobs = true
	}
	if p.keyword("WHERE") {
		e, err := p.or()
		if err != nil {
			return nil, err
		}
		q.Where = e
	}
	if p.peek().kind != tEOF {
		return nil, p.errorf("unexpected text")
	}
	return q, nil
}

func (p *parser) enter() error {
	p.depth++
	if p.depth > maxQueryDepth {
		return fmt.Errorf("%w: nested deeper than %d", ErrQuery, maxQueryDepth)
	}
	return nil
}

func (p *parser) or() (Expr, error) {
	if err := p.enter(); err != nil {
		return nil, err
	}
	defer func() { p.depth-- }()
	l, err := p.and()
	if err != nil {
		return nil, err
	}
	for p.keyword("OR") {
		r, err := p.and()
		if err != nil {
			return nil, err
		}
		l = orExpr{l, r}
	}
	return l, nil
}

func (p *parser) and() (Expr, error) {
	l, err := p.unary()
	if err != nil {
		return nil, err
	}
	for p.keyword("AND") {
		r, err := p.unary()
		if err != nil {
			return nil, err
		}
		l = andExpr{l, r}
	}
	return l, nil
}

func (p *parser) unary() (Expr, error) {
	if err := p.enter(); err != nil {
		return nil, err
	}
	defer func() { p.depth-- }()
	if p.keyword("NOT") {
		e, err := p.unary()
		if err != nil {
			return nil, err
		}
		return notExpr{e}, nil
	}
	if p.punct("(") {
		e, err := p.or()
		if err != nil {
			return nil, err
		}
		if !p.punct(")") {
			return nil, p.errorf("expected )")
		}
		return e, nil
	}
	return p.predicate()
}

func (p *parser) predicate() (Expr, error) {
	if t := p.peek(); t.kind == tIdent && strings.EqualFold(t.text, "is_defined") &&
		p.toks[p.i+1].kind == tPunct && p.toks[p.i+1].text == "(" {
		p.i += 2
		path, err := p.path()
		if err != nil {
			return nil, err
		}
		if !p.punct(")") {
			return nil, p.errorf("expected ) after is_defined path")
		}
		return definedExpr{path}, nil
	}
	if lit, ok, err := p.literal(); err != nil {
		return nil, err
	} else if ok { // literal op path
		op, err := p.op()
		if err != nil {
			return nil, err
		}
		path, err := p.path()
		if err != nil {
			return nil, err
		}
		return cmpExpr{path: path, op: flip(op), lit: lit}, nil
	}
	path, err := p.path()
	if err != nil {
		return nil, err
	}
	if in, not := p.keyword("IN"), false; in || p.keyword("NIN") {
		not = !in
		return p.inList(path, not)
	}
	op, err := p.op()
	if err != nil {
		return nil, err
	}
	lit, ok, err := p.literal()
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, p.errorf("expected a literal (only property-to-constant comparisons are supported)")
	}
	return cmpExpr{path: path, op: op, lit: lit}, nil
}

// maxInList bounds the literals of one IN list.
const maxInList = 1000

// inList parses [lit, lit, …] after IN or NIN.
func (p *parser) inList(path []string, not bool) (Expr, error) {
	if !p.punct("[") {
		return nil, p.errorf("expected [ after IN")
	}
	e := inExpr{path: path, not: not}
	for {
		lit, ok, err := p.literal()
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, p.errorf("expected a literal in the IN list")
		}
		if len(e.lits) == maxInList {
			return nil, fmt.Errorf("%w: more than %d values in an IN list", ErrQuery, maxInList)
		}
		e.lits = append(e.lits, lit)
		if p.punct("]") {
			return e, nil
		}
		if !p.punct(",") {
			return nil, p.errorf("expected , or ] in the IN list")
		}
	}
}

func flip(op string) string {
	switch op {
	case "<":
		return ">"
	case ">":
		return "<"
	case "<=":
		return ">="
	case ">=":
		return "<="
	}
	return op
}

func (p *parser) op() (string, error) {
	t := p.peek()
	if t.kind != tOp {
		return "", p.errorf("expected a comparison operator")
	}
	p.i++
	return t.text, nil
}

// reserved words cannot be property names.
func reserved(s string) bool {
	switch strings.ToUpper(s) {
	case "SELECT", "TOP", "FROM", "WHERE", "AND", "OR", "NOT", "TRUE", "FALSE", "NULL", "IN", "NIN":
		return true
	}
	return false
}

func (p *parser) path() ([]string, error) {
	var path []string
	for {
		t := p.peek()
		if t.kind != tIdent || reserved(t.text) {
			return nil, p.errorf("expected a property name")
		}
		p.i++
		path = append(path, t.text)
		if !p.punct(".") {
			return path, nil
		}
	}
}

func (p *parser) literal() (literal, bool, error) {
	t := p.peek()
	switch t.kind {
	case tString:
		p.i++
		return literal{kind: litString, s: t.text}, true, nil
	case tNumber:
		p.i++
		f, err := strconv.ParseFloat(t.text, 64)
		if err != nil {
			return literal{}, false, fmt.Errorf("%w: bad number %q", ErrQuery, t.text)
		}
		return literal{kind: litNumber, s: t.text, n: f}, true, nil
	case tIdent:
		switch strings.ToLower(t.text) {
		case "true", "false":
			p.i++
			return literal{kind: litBool, b: strings.EqualFold(t.text, "true")}, true, nil
		case "null":
			p.i++
			return literal{kind: litNull}, true, nil
		}
	}
	return literal{}, false, nil
}
