// helm-render renders a Helm chart the way `helm template` does, for the tests of
// charts/coffea-hq on machines where helm itself cannot be installed.
//
// It is built in GOPATH mode from Debian's Go packages (see build.sh), so it uses the
// same libraries Helm 3 is made of: text/template, Masterminds/sprig v3, ghodss/yaml
// (the library sigs.k8s.io/yaml was forked from) and xeipuuv/gojsonschema (Helm's
// values.schema.json validator before 3.18). What it covers, and what it does not, is
// written down in docs/deploy.md ("Rendering the chart without helm"); keep the chart's
// templates inside that subset.
//
// Usage:
//
//	helm-render [--release NAME] [--namespace NS] [--kube-version vX.Y.Z]
//	            [--api-versions G/V]... [-f values.yaml]... [--notes] CHART_DIR
//
// It prints the manifests as `helm template` does ("---" + "# Source:" per document,
// sorted in Helm's install order), or with --notes the rendered NOTES.txt alone.
// Errors (bad values, a failing `required`/`fail`, a template or YAML error) go to
// stderr with exit status 1, worded as Helm words them.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"github.com/ghodss/yaml"
	"github.com/xeipuuv/gojsonschema"
)

// ChartMetadata holds the Chart.yaml fields templates read as .Chart.X (Helm's
// chart.Metadata, a struct, so a misspelt field is a template error as in Helm).
type ChartMetadata struct {
	APIVersion   string            `json:"apiVersion"`
	Name         string            `json:"name"`
	Version      string            `json:"version"`
	AppVersion   string            `json:"appVersion"`
	Description  string            `json:"description"`
	Type         string            `json:"type"`
	KubeVersion  string            `json:"kubeVersion"`
	Home         string            `json:"home"`
	Icon         string            `json:"icon"`
	Keywords     []string          `json:"keywords"`
	Sources      []string          `json:"sources"`
	Annotations  map[string]string `json:"annotations"`
	Deprecated   bool              `json:"deprecated"`
	Dependencies []interface{}     `json:"dependencies"`
}

// KubeVersion mirrors chartutil.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (k KubeVersion) String() string { return k.Version }

// GitVersion is Helm's deprecated alias of Version.
func (k KubeVersion) GitVersion() string { return k.Version }

// VersionSet mirrors chartutil.VersionSet.
type VersionSet []string

// Has tells whether an API version ("apps/v1") or version/kind ("apps/v1/Deployment") is known.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// Capabilities mirrors chartutil.Capabilities (what `helm template` offers without a cluster).
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion map[string]string
}

// The API versions `helm template` assumes without a cluster (chartutil.DefaultVersionSet
// is every built-in group version of its client-go; this is the part charts test for).
var defaultAPIVersions = []string{
	"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v1", "autoscaling/v2",
	"networking.k8s.io/v1", "rbac.authorization.k8s.io/v1", "storage.k8s.io/v1",
	"apiextensions.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1",
	"scheduling.k8s.io/v1", "admissionregistration.k8s.io/v1",
}

// installOrder is Helm's releaseutil.InstallOrder: the order manifests are printed in.
var installOrder = []string{
	"Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
	"PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap",
	"StorageClass", "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition",
	"ClusterRole", "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role",
	"RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
	"ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler",
	"StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
}

const (
	warnStart      = "HELM_ERR_START"
	warnEnd        = "HELM_ERR_END"
	recursionLimit = 1000
)

var warnRegex = regexp.MustCompile(warnStart + `(.*)` + warnEnd)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

func run(argv []string) error {
	fs := flag.NewFlagSet("helm-render", flag.ContinueOnError)
	release := fs.String("release", "release-name", "release name (.Release.Name)")
	namespace := fs.String("namespace", "default", "namespace (.Release.Namespace)")
	kubeVersion := fs.String("kube-version", "v1.30.0", "Kubernetes version (.Capabilities.KubeVersion)")
	notes := fs.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	var valueFiles, apiVersions stringList
	fs.Var(&valueFiles, "f", "values file (repeatable; later files win)")
	fs.Var(&valueFiles, "values", "values file (repeatable; later files win)")
	fs.Var(&apiVersions, "api-versions", "extra API version for .Capabilities.APIVersions (repeatable)")
	// Go's flag package stops at the first positional argument; Helm allows flags after
	// the chart, so move the chart path to the end first.
	if err := fs.Parse(reorder(argv)); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("give exactly one chart directory")
	}
	chartDir := fs.Arg(0)

	meta, err := loadChart(chartDir)
	if err != nil {
		return err
	}
	values, err := loadValues(filepath.Join(chartDir, "values.yaml"), valueFiles)
	if err != nil {
		return err
	}
	if err := validateSchema(chartDir, meta.Name, values); err != nil {
		return err
	}
	caps, err := capabilities(*kubeVersion, apiVersions)
	if err != nil {
		return err
	}
	top := map[string]interface{}{
		"Values": values,
		"Chart":  meta,
		"Release": map[string]interface{}{
			"Name": *release, "Namespace": *namespace, "IsInstall": true,
			"IsUpgrade": false, "Revision": 1, "Service": "Helm",
		},
		"Capabilities": caps,
		"Files":        map[string]interface{}{},
	}
	rendered, err := renderTemplates(chartDir, meta.Name, top)
	if err != nil {
		return err
	}
	notesName := meta.Name + "/templates/NOTES.txt"
	if *notes {
		text, ok := rendered[notesName]
		if !ok {
			return errors.New("the chart has no templates/NOTES.txt")
		}
		fmt.Print(text)
		return nil
	}
	delete(rendered, notesName)
	return printManifests(rendered)
}

func reorder(argv []string) []string {
	var flags, positional []string
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		switch {
		case a == "--notes" || a == "-notes" || strings.Contains(a, "="):
			flags = append(flags, a)
		case strings.HasPrefix(a, "-") && i+1 < len(argv):
			flags = append(flags, a, argv[i+1])
			i++
		case strings.HasPrefix(a, "-"):
			flags = append(flags, a)
		default:
			positional = append(positional, a)
		}
	}
	return append(flags, positional...)
}

func loadChart(dir string) (*ChartMetadata, error) {
	data, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, fmt.Errorf("Chart.yaml file is missing: %w", err)
	}
	var meta ChartMetadata
	if err := yaml.Unmarshal(data, &meta); err != nil {
		return nil, fmt.Errorf("cannot load Chart.yaml: %w", err)
	}
	switch {
	case meta.APIVersion != "v2":
		return nil, fmt.Errorf("Chart.yaml: apiVersion must be v2, got %q", meta.APIVersion)
	case meta.Name == "":
		return nil, errors.New("validation: chart.metadata.name is required")
	case meta.Version == "":
		return nil, errors.New("validation: chart.metadata.version is required")
	case meta.Type != "" && meta.Type != "application":
		return nil, fmt.Errorf("chart type %q is not supported by helm-render", meta.Type)
	case len(meta.Dependencies) > 0:
		return nil, errors.New("chart dependencies (subcharts) are not supported by helm-render")
	}
	return &meta, nil
}

// readYAML parses a YAML file the way Helm does: YAML to JSON to Go values, so every
// number is a float64 (that is what makes `int`, `eq` and printf behave as in Helm).
func readYAML(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("failed to parse %s: %w", file, err)
	}
	if out == nil {
		out = map[string]interface{}{}
	}
	return out, nil
}

func loadValues(defaults string, overrides []string) (map[string]interface{}, error) {
	base, err := readYAML(defaults)
	if err != nil {
		return nil, err
	}
	user := map[string]interface{}{}
	for _, file := range overrides {
		next, err := readYAML(file)
		if err != nil {
			return nil, err
		}
		user = mergeMaps(user, next)
	}
	return coalesce(user, base), nil
}

// mergeMaps merges b into a, b winning, as Helm merges several -f files.
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if vm, ok := v.(map[string]interface{}); ok {
			if om, ok := out[k].(map[string]interface{}); ok {
				out[k] = mergeMaps(om, vm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// coalesce lays user values over the chart's defaults as chartutil.CoalesceValues does:
// tables merge key by key, anything else from the user replaces the default, and a user
// null deletes the key.
func coalesce(user, defaults map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(defaults))
	for k, v := range defaults {
		out[k] = v
	}
	for k, v := range user {
		if v == nil {
			delete(out, k)
			continue
		}
		um, uok := v.(map[string]interface{})
		dm, dok := out[k].(map[string]interface{})
		if uok && dok {
			out[k] = coalesce(um, dm)
			continue
		}
		if _, isMap := out[k].(map[string]interface{}); isMap && !uok {
			fmt.Fprintf(os.Stderr, "coalesce.go: warning: cannot overwrite table with non table for %s (%v)\n", k, out[k])
			continue
		}
		out[k] = v
	}
	return out
}

// validateSchema checks the values against values.schema.json as Helm 3 does, with the
// same library and the same message.
func validateSchema(dir, chartName string, values map[string]interface{}) error {
	schema, err := os.ReadFile(filepath.Join(dir, "values.schema.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	valuesJSON, err := json.Marshal(values)
	if err != nil {
		return err
	}
	result, err := gojsonschema.Validate(gojsonschema.NewBytesLoader(schema),
		gojsonschema.NewBytesLoader(valuesJSON))
	if err != nil {
		return fmt.Errorf("%s: cannot read values.schema.json: %w", chartName, err)
	}
	if result.Valid() {
		return nil
	}
	var sb strings.Builder
	for _, desc := range result.Errors() {
		fmt.Fprintf(&sb, "- %s\n", desc)
	}
	return fmt.Errorf("values don't meet the specifications of the schema(s) in the following chart(s):\n%s:\n%s",
		chartName, sb.String())
}

var kubeVersionRe = regexp.MustCompile(`^v?(\d+)\.(\d+)(\.\d+)?$`)

func capabilities(kubeVersion string, extra []string) (*Capabilities, error) {
	m := kubeVersionRe.FindStringSubmatch(kubeVersion)
	if m == nil {
		return nil, fmt.Errorf("invalid kube version %q", kubeVersion)
	}
	version := kubeVersion
	if !strings.HasPrefix(version, "v") {
		version = "v" + version
	}
	if m[3] == "" {
		version += ".0"
	}
	apis := append(VersionSet{}, defaultAPIVersions...)
	apis = append(apis, extra...)
	return &Capabilities{
		KubeVersion: KubeVersion{Version: version, Major: m[1], Minor: m[2]},
		APIVersions: apis,
		HelmVersion: map[string]string{"version": "v3-compatible (helm-render)"},
	}, nil
}

// funcMap is Helm's: sprig's text functions without env/expandenv, plus Helm's own.
// include, tpl and required are bound per render in renderTemplates.
func funcMap() template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["fromYaml"] = fromYAML
	f["fromYamlArray"] = fromYAMLArray
	f["toJson"] = toJSON
	f["fromJson"] = fromJSON
	f["fromJsonArray"] = fromJSONArray
	// Like `helm template`, there is no cluster to look anything up in.
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["required"] = func(warn string, val interface{}) (interface{}, error) {
		if val == nil {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		if s, ok := val.(string); ok && s == "" {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		return val, nil
	}
	return f
}

func toYAML(v interface{}) string {
	data, err := yaml.Marshal(v)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(data), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromYAMLArray(s string) []interface{} {
	a := []interface{}{}
	if err := yaml.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromJSONArray(s string) []interface{} {
	a := []interface{}{}
	if err := json.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

type source struct {
	name string // "<chart>/templates/<file>", as Helm names templates
	text string
}

func readTemplates(dir, chartName string) ([]source, error) {
	root := filepath.Join(dir, "templates")
	var out []source
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out = append(out, source{name: path.Join(chartName, filepath.ToSlash(rel)), text: string(data)})
		return nil
	})
	return out, err
}

// sortByPathLen orders templates as Helm parses them: shallower paths first, then by name.
func sortByPathLen(srcs []source) {
	sort.SliceStable(srcs, func(i, j int) bool {
		a, b := srcs[i].name, srcs[j].name
		ca, cb := strings.Count(a, "/"), strings.Count(b, "/")
		if ca == cb {
			return a < b
		}
		return ca < cb
	})
}

func renderTemplates(dir, chartName string, top map[string]interface{}) (map[string]string, error) {
	srcs, err := readTemplates(dir, chartName)
	if err != nil {
		return nil, err
	}
	sortByPathLen(srcs)
	t := template.New("gotpl").Option("missingkey=zero")
	funcs := funcMap()
	included := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if included[name] > recursionLimit {
			return "", fmt.Errorf("rendering template has a nested reference name: %s: unable to execute template", name)
		}
		included[name]++
		defer func() { included[name]-- }()
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, vals map[string]interface{}) (string, error) {
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		name := "tpl"
		if tmpl, ok := vals["Template"].(map[string]interface{}); ok {
			if n, ok := tmpl["Name"].(string); ok {
				name = n
			}
		}
		if _, err := clone.New(name).Parse(text); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		var buf strings.Builder
		if err := clone.ExecuteTemplate(&buf, name, vals); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	t.Funcs(funcs)
	for _, s := range srcs {
		if _, err := t.New(s.name).Parse(s.text); err != nil {
			return nil, parseError(s.name, err)
		}
	}
	out := map[string]string{}
	for _, s := range srcs {
		if strings.HasPrefix(path.Base(s.name), "_") {
			continue // partials are only included, never rendered on their own
		}
		vals := make(map[string]interface{}, len(top)+1)
		for k, v := range top {
			vals[k] = v
		}
		vals["Template"] = map[string]interface{}{
			"Name": s.name, "BasePath": path.Join(chartName, "templates"),
		}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, s.name, vals); err != nil {
			return nil, execError(s.name, err)
		}
		out[s.name] = strings.ReplaceAll(buf.String(), "<no value>", "")
	}
	return out, nil
}

func parseError(name string, err error) error {
	tokens := strings.Split(err.Error(), ": ")
	if len(tokens) < 3 {
		return fmt.Errorf("parse error in (%s): %s", name, err)
	}
	return fmt.Errorf("parse error at (%s): %s", tokens[1], tokens[len(tokens)-1])
}

func execError(name string, err error) error {
	var ee template.ExecError
	if !errors.As(err, &ee) {
		return err
	}
	tokens := strings.SplitN(err.Error(), ": ", 3)
	if len(tokens) != 3 {
		return fmt.Errorf("execution error in (%s): %s", name, err)
	}
	if parts := warnRegex.FindStringSubmatch(tokens[2]); len(parts) >= 2 {
		return fmt.Errorf("execution error at (%s): %s", tokens[1], parts[1])
	}
	// Like Helm, show a `fail` message alone, without the template call chain around it.
	msg := tokens[2]
	if i := strings.LastIndex(msg, "error calling fail: "); i >= 0 {
		msg = msg[i+len("error calling fail: "):]
	}
	return fmt.Errorf("execution error at (%s): %s", tokens[1], msg)
}

type manifest struct {
	source string
	kind   string
	name   string
	body   string
}

var separator = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

// printManifests splits each rendered file into documents, checks each is YAML with a
// head (as Helm's SortManifests does), sorts them in install order and prints them.
func printManifests(rendered map[string]string) error {
	names := make([]string, 0, len(rendered))
	for n := range rendered {
		names = append(names, n)
	}
	sort.Strings(names)
	var all []manifest
	for _, n := range names {
		if strings.HasSuffix(n, ".txt") {
			continue
		}
		for _, doc := range separator.Split(rendered[n], -1) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			var head struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				return fmt.Errorf("YAML parse error on %s: %w", n, err)
			}
			all = append(all, manifest{source: n, kind: head.Kind, name: n, body: doc})
		}
	}
	order := map[string]int{}
	for i, k := range installOrder {
		order[k] = i
	}
	sort.SliceStable(all, func(i, j int) bool {
		a, b := all[i], all[j]
		ia, aok := order[a.kind]
		ib, bok := order[b.kind]
		switch {
		case aok && bok && ia != ib:
			return ia < ib
		case aok != bok:
			return aok
		case !aok && a.kind != b.kind:
			return a.kind < b.kind
		}
		return a.name < b.name
	})
	var buf bytes.Buffer
	for _, m := range all {
		fmt.Fprintf(&buf, "---\n# Source: %s\n%s\n", m.source, strings.TrimSpace(m.body))
	}
	_, err := os.Stdout.Write(buf.Bytes())
	return err
}
