// Command check validates the Kubernetes manifests of deploy/kubernetes offline, without a
// cluster: every file the kustomization lists is decoded strictly into its Kubernetes API type
// (k8s.io/api), so an unknown or misspelt field, or a value of the wrong type, is an error; and
// the objects are checked against each other: the selectors of the Deployment, the Service and the
// PodDisruptionBudget match the pod's labels, every probe and the Service name a port the
// container has, and every ConfigMap and Secret a pod uses is one of the manifests.
//
//	go run . ../          (from deploy/kubernetes/check; make test runs it)
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

type manifests struct {
	deployments []appsv1.Deployment
	jobs        []batchv1.Job
	services    []corev1.Service
	configMaps  []corev1.ConfigMap
	secrets     []corev1.Secret
	pdbs        []policyv1.PodDisruptionBudget
}

func main() {
	dir := "."
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	var problems []string
	fail := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	m, err := load(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	check(m, fail)
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "error:", p)
		}
		os.Exit(1)
	}
	fmt.Printf("ok: %d deployment(s), %d job(s), %d service(s), %d configmap(s), %d secret(s), %d pdb(s)\n",
		len(m.deployments), len(m.jobs), len(m.services), len(m.configMaps), len(m.secrets), len(m.pdbs))
}

// load reads the kustomization and decodes every resource it lists into its API type, strictly.
func load(dir string) (*manifests, error) {
	text, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		return nil, err
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(text, &k); err != nil {
		return nil, fmt.Errorf("kustomization.yaml: %w", err)
	}
	if k.Kind != "Kustomization" || len(k.Resources) == 0 {
		return nil, fmt.Errorf("kustomization.yaml: a Kustomization with resources is expected")
	}
	m := &manifests{}
	for _, file := range k.Resources {
		text, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			return nil, fmt.Errorf("kustomization.yaml lists %s: %w", file, err)
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(text, &meta); err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		strict := func(into any) error {
			if err := yaml.UnmarshalStrict(text, into); err != nil {
				return fmt.Errorf("%s (%s %s): %w", file, meta.APIVersion, meta.Kind, err)
			}
			return nil
		}
		switch meta.APIVersion + " " + meta.Kind {
		case "apps/v1 Deployment":
			var o appsv1.Deployment
			err = strict(&o)
			m.deployments = append(m.deployments, o)
		case "batch/v1 Job":
			var o batchv1.Job
			err = strict(&o)
			m.jobs = append(m.jobs, o)
		case "v1 Service":
			var o corev1.Service
			err = strict(&o)
			m.services = append(m.services, o)
		case "v1 ConfigMap":
			var o corev1.ConfigMap
			err = strict(&o)
			m.configMaps = append(m.configMaps, o)
		case "v1 Secret":
			var o corev1.Secret
			err = strict(&o)
			m.secrets = append(m.secrets, o)
		case "policy/v1 PodDisruptionBudget":
			var o policyv1.PodDisruptionBudget
			err = strict(&o)
			m.pdbs = append(m.pdbs, o)
		default:
			err = fmt.Errorf("%s: %s %s is not a kind this check knows", file, meta.APIVersion, meta.Kind)
		}
		if err != nil {
			return nil, err
		}
	}
	return m, nil
}

func check(m *manifests, fail func(string, ...any)) {
	configMaps := map[string]bool{}
	for _, c := range m.configMaps {
		configMaps[c.Name] = true
	}
	secrets := map[string]bool{}
	for _, s := range m.secrets {
		secrets[s.Name] = true
	}
	var pods []corev1.PodTemplateSpec
	for _, d := range m.deployments {
		what := "Deployment " + d.Name
		if d.Spec.Selector == nil {
			fail("%s has no selector", what)
			continue
		}
		selector, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !selector.Matches(labels.Set(d.Spec.Template.Labels)) {
			fail("%s: its selector does not match its pod template's labels", what)
		}
		pod(what, d.Spec.Template.Spec, configMaps, secrets, fail)
		pods = append(pods, d.Spec.Template)
	}
	for _, j := range m.jobs {
		pod("Job "+j.Name, j.Spec.Template.Spec, configMaps, secrets, fail)
	}
	for _, s := range m.services {
		what := "Service " + s.Name
		if len(s.Spec.Selector) == 0 {
			fail("%s selects no pod", what)
			continue
		}
		selected := 0
		for _, p := range pods {
			if labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(p.Labels)) {
				selected++
				for _, port := range s.Spec.Ports {
					if !hasPort(p.Spec, port.TargetPort) {
						fail("%s: targetPort %s is no port of the pods it selects", what, port.TargetPort.String())
					}
				}
			}
		}
		if selected == 0 {
			fail("%s selects none of the Deployments' pods", what)
		}
	}
	for _, b := range m.pdbs {
		what := "PodDisruptionBudget " + b.Name
		selector, err := metav1.LabelSelectorAsSelector(b.Spec.Selector)
		if err != nil {
			fail("%s: %v", what, err)
			continue
		}
		matched := false
		for _, p := range pods {
			matched = matched || selector.Matches(labels.Set(p.Labels))
		}
		if !matched {
			fail("%s selects none of the Deployments' pods", what)
		}
	}
}

// pod checks one pod spec: images set, probes on a port the container has, and ConfigMaps and
// Secrets that are among the manifests (a Secret the kustomization does not ship is named in
// its comments, and allowed when its name says it is the database owner's).
func pod(what string, spec corev1.PodSpec, configMaps, secrets map[string]bool, fail func(string, ...any)) {
	if len(spec.Containers) == 0 {
		fail("%s has no container", what)
	}
	for _, c := range spec.Containers {
		if c.Image == "" {
			fail("%s: container %s has no image", what, c.Name)
		}
		for name, probe := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
			if probe != nil && probe.HTTPGet != nil && !hasPort(spec, probe.HTTPGet.Port) {
				fail("%s: the %s probe's port %s is no port of container %s", what, name, probe.HTTPGet.Port.String(), c.Name)
			}
		}
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				known(what, "Secret", e.ValueFrom.SecretKeyRef.Name, secrets, fail)
			}
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil {
				known(what, "ConfigMap", e.ValueFrom.ConfigMapKeyRef.Name, configMaps, fail)
			}
		}
	}
	for _, v := range spec.Volumes {
		if v.ConfigMap != nil {
			known(what, "ConfigMap", v.ConfigMap.Name, configMaps, fail)
		}
		if v.Secret != nil {
			known(what, "Secret", v.Secret.SecretName, secrets, fail)
		}
	}
}

func known(what, kind, name string, names map[string]bool, fail func(string, ...any)) {
	if !names[name] && !strings.HasSuffix(name, "-owner") {
		fail("%s uses %s %s, which is not among the manifests", what, kind, name)
	}
}

func hasPort(spec corev1.PodSpec, port intstr.IntOrString) bool {
	for _, c := range spec.Containers {
		for _, p := range c.Ports {
			if (port.Type == intstr.String && p.Name == port.StrVal) || (port.Type == intstr.Int && p.ContainerPort == port.IntVal) {
				return true
			}
		}
	}
	return false
}
